"""Distillation training of Qwen2.5-Coder-0.5B-Instruct's mapper and LoRA (CPU-feasible).

The model is the converted folder ~/.cache/psynth_jax/models/qwen2.5-coder-0.5b-instruct
(`psynth_jax.convert.fetch_qwen_coder`). Targets are the model's own
text-concatenation syntheses on the synthetic suite, written first (resumable):

  python experiments/make_traces.py --config psynth_jax/configs/traces.py:qwen05 \\
    --config.out=/tmp/psynth/traces/qwen05_synthetic.jsonl
  python experiments/train.py --config psynth_jax/configs/qwen2_5_coder_0_5b.py --workdir /tmp/psynth/qwen05

`:kl` adds the token-level KL to the text-concatenation teacher (weight 0.5).
`:stage1[,arm]` / `:stage2[,arm]` train on the real-data stages instead
(psynth_jax/configs/stages.py).
On 2 CPU cores one step of 2 examples takes tens of seconds (see
experiments/bench_train.py), so the default is a short run of 128 steps.
"""

from ml_collections import ConfigDict

from psynth_jax.configs import stages
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
  elif arg.split(",")[0] in stages.STAGES:
    stages.apply(c, arg, "qwen05")
  elif arg:
    raise ValueError(
      f"unknown argument {arg!r}: '', 'kl', or a stage (psynth_jax/configs/stages.py)"
    )
  return c
