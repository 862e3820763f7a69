"""Distillation training of Qwen2.5-Coder-0.5B-Instruct's mapper and LoRA (CPU-feasible).

The model is the converted folder ~/.cache/psynth_jax/models/qwen2.5-coder-0.5b-instruct
(`psynth_jax.convert.fetch_qwen_coder`). Targets are the model's own
text-concatenation syntheses on the synthetic suite, written first (resumable):

  python experiments/make_traces.py --config psynth_jax/configs/traces.py:qwen05 \\
    --config.out=/tmp/psynth/traces/qwen05_synthetic.jsonl
  python experiments/train.py --config psynth_jax/configs/qwen2_5_coder_0_5b.py --workdir /tmp/psynth/qwen05

`:kl` adds the token-level KL to the text-concatenation teacher (weight 0.5).
On 2 CPU cores one step of 2 examples takes tens of seconds (see
experiments/bench_train.py), so the default is a short run of 128 steps.
"""

from ml_collections import ConfigDict

from psynth_jax.configs.base import default_config

MODEL = "~/.cache/psynth_jax/models/qwen2.5-coder-0.5b-instruct"


def get_config(arg: str = "") -> ConfigDict:
  c = default_config()
  c.model.path = MODEL
  c.data.source = "jsonl"
  c.data.train_jsonl = "/tmp/psynth/traces/qwen05_synthetic.jsonl"
  # Qwen's tokens for the synthetic suite (K <= 4): branches <= 36 tokens,
  # <= 135 together; chat synthesizer prompt 66, text-synthesis prompt <= 222;
  # targets <= 48 generated tokens + eos. Worker prompts (chat template around the
  # record's `worker_prompts[i]`) <= 72 tokens for the suite's instruction lines,
  # <= 108 for make_traces' --run_workers messages (3000 train examples, K <= 4):
  # branches are re-encoded after them, as the workers wrote them.
  c.batch.update(
    batch_size=2,
    max_branches=4,
    branch_tokens=40,
    branch_rows=144,
    synth_tokens=136,
    target_tokens=64,
    teacher_tokens=288,
    worker_prompt_tokens=112,
  )
  c.train.num_steps = 128
  c.optimizer.learning_rate = 1e-4  # the paper's AdamW, no weight decay, no schedule
  c.checkpoint.every = 16
  c.log_every = 1
  if arg == "kl":
    c.train.kl_weight = 0.5
  elif arg in ("stage1", "stage2"):
    _real_data(c, arg)
  elif arg:
    raise ValueError(f"unknown argument {arg!r} (expected '', 'kl', 'stage1' or 'stage2')")
  return c


def _real_data(c: ConfigDict, stage: str) -> None:
  """Budgets for the paper's two stages on real data, scaled to 2 CPU cores.

  stage1 (experiments/build_stage1.py traces: chat rounds, tool calls, in-context
  examples, retrieved chunks): up to 8 branches of <= 512 tokens, 2048 cache rows, a
  target of <= 256 tokens (a retrieval problem's 5 chunks are ~1,750 tokens at the
  median). Longer problems are dropped at build time (`build_stage1.py --budget <this
  config>` keeps only those that fit, and its data card says how many).
  stage2 (experiments/build_stage2.py: 3 workers' outputs of <= 512 tokens, the text
  synthesizer's answer of <= 512): the eval harness's CPU budgets.
  """
  c.data.train_jsonl = f"runs/{stage}/train.jsonl"
  if stage == "stage1":
    c.batch.update(
      max_branches=8,
      branch_tokens=512,
      branch_rows=2048,
      synth_tokens=576,
      target_tokens=256,
      teacher_tokens=2560,  # the text teacher (KL arms, held-out CE): chunks pasted + target
      worker_prompt_tokens=0,  # stage-1 chunks are context: no worker wrote them
    )
  else:
    c.batch.update(
      max_branches=3,
      branch_tokens=512,
      branch_rows=1536,
      synth_tokens=768,
      target_tokens=512,
      teacher_tokens=2560,
      worker_prompt_tokens=384,
    )
  c.train.num_steps = 500  # 1,000 examples at batch 2
  c.checkpoint.every = 10
