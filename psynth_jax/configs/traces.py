r"""Trace-making configs for `experiments/make_traces.py` (distillation targets).

  # the synthetic suite: gold branches, targets from the shipped base's text synthesis
  python experiments/make_traces.py --config psynth_jax/configs/traces.py \
    --config.out=/tmp/psynth/traces/synthetic.jsonl
  # Qwen2.5-Coder-0.5B on the suite's problems (gold branches) with chat prompts
  python experiments/make_traces.py --config psynth_jax/configs/traces.py:qwen05 \
    --config.out=/tmp/psynth/traces/qwen05_synthetic.jsonl
  # your own problems: a registered task reading a file
  python experiments/make_traces.py --config psynth_jax/configs/traces.py \
    --config.task=chat --config.path=/data/problems.jsonl --config.run_workers=True \
    --config.model=PATH --config.out=OUT
"""

from ml_collections import ConfigDict

from psynth_jax.configs.qwen2_5_coder_0_5b import MODEL as QWEN05
from psynth_jax.eval.shipped import SYNTHETIC_BASE


def get_config(arg: str = "synthetic") -> ConfigDict:
  if arg not in ("synthetic", "qwen05"):
    raise ValueError(f"unknown traces config {arg!r}; expected synthetic or qwen05")
  c = ConfigDict(
    dict(
      model=SYNTHETIC_BASE,  # converted folder, HF folder or .gguf
      task="synthetic",  # a registered task (psynth_jax.tasks.names())
      path="",  # the task's problems from this file; "" = its default source
      split="train",
      num=1000,  # problems (the first `num` of the split)
      seed=0,
      task_options=dict(max_workers=8),  # extra Task.load arguments
      run_workers=False,  # decode branches with the model (else the problems' gold branches)
      num_workers=3,  # K for problems without gold branches
      max_new_tokens=64,  # per worker output and per target
      batch_size=8,  # targets generated together
      out="",
    )
  )
  if arg == "qwen05":
    c.update(model=QWEN05, task="synthetic_chat", num=256, max_new_tokens=48)
    c.task_options.max_workers = 4
  return c
