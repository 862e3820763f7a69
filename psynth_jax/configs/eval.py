r"""Benchmark evaluation configs for `psynth eval` (the reference protocol, CPU budgets).

  psynth eval --config psynth_jax/configs/eval.py:humaneval --model DIR --workdir runs/eval/humaneval
  psynth eval --config psynth_jax/configs/eval.py:gsm8k --model DIR --workdir runs/eval/gsm8k \
    --limit 200 --adapter ps=runs/train/export
  psynth eval --config psynth_jax/configs/eval.py:gsm8k --workdir runs/eval/gsm8k --rescore

The argument is a registered task (`psynth_jax.tasks.names()`). K = 3 workers,
greedy, as the paper; its budgets are 4096 tokens per worker and per answer,
the defaults here are smaller for a CPU (`--set worker_tokens=4096`).
"""

from ml_collections import ConfigDict

# Code needs room for a whole function; math and multiple choice a worked answer.
_TOKENS = {"humaneval": 384, "mbpp": 384, "humaneval_plus": 384, "mbpp_plus": 384}


def get_config(task: str = "gsm8k") -> ConfigDict:
  tokens = _TOKENS.get(task, 512)
  return ConfigDict(
    dict(
      task=task,
      path="",  # the task's problems from this local file; "" = its packaged copy
      # A prompt-template file in the shape of psynth_jax/tasks/prompts.json (e.g. the
      # reference release's wording); "" = ours. Benchmark tasks only.
      templates="",
      limit=0,  # 0: every problem
      subset_seed=-1,  # >= 0: `limit` problems drawn with this seed; -1: the first `limit`
      num_workers=3,
      worker_tokens=tokens,
      answer_tokens=tokens,
      single_agent=True,
      text_synthesis=True,
      naive_merge=True,
      # Where the model runs: "DATA,FSDP,TENSOR" (e.g. "1,1,8"; `psynth eval --mesh` wins),
      # "" = one device; dtype "" = the checkpoint's (`--dtype` wins).
      mesh="",
      dtype="",
      # Problems whose workers (and text-mode answers) share one compiled program;
      # 1: one problem at a time, with a (non-benchmark) TTFT per answer.
      batch_problems=4,
    )
  )
