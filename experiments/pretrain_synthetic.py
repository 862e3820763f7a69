r"""Pretrains the tiny synthetic-suite base model and saves it as a converted model folder.

Run (the shipped model's three phases, about 30, 60 and 50 minutes on 2 CPU
cores, as experiments/reproduce_synthetic.py runs them from psynth_jax/configs/synthetic.py):

  python experiments/pretrain_synthetic.py --out=runs/base_phase1
  python experiments/pretrain_synthetic.py --out=runs/base_phase2 --phase=phase2 \
    --config.pretrain.init_from=runs/base_phase1
  python experiments/pretrain_synthetic.py --out=runs/base --phase=phase3 \
    --config.pretrain.init_from=runs/base_phase2

`--phase=phaseN` applies `config.pretrain_more.phaseN` over `config.pretrain`
(phase1: `config.pretrain` alone). Any field can be overridden, in the block it
comes from: `--config.pretrain.steps=300 --config.pretrain.hidden_size=64` for a
quick try, `--config.pretrain_more.phase2.steps=300` for a short phase 2. The
folder gets psynth_config.json + model.safetensors (load with
`psynth_jax.load_pretrained`), the suite tokenizer, and pretrain_info.json
(config, timings, validation history, test accuracy). Then it prints the
text-synthesis accuracy per family on the test split (gold branches) and, with
`--workflow_examples=N`, the single-agent / text / naive-merge table of
`psynth_jax.eval` on N test examples (workers run by the model itself).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from psynth_jax.tasks import synthetic
from psynth_jax.tasks import synthetic_pretrain as pretrain

_CONFIG = config_flags.DEFINE_config_file(
  "config", "psynth_jax/configs/synthetic.py", "psynth_jax/configs/NAME.py[:arg]", lock_config=True
)
_PHASE = flags.DEFINE_string("phase", "phase1", "phase1, or a key of config.pretrain_more")
_OUT = flags.DEFINE_string("out", "runs/synthetic_base", "the model folder to write")
_TEST_EXAMPLES = flags.DEFINE_integer("test_examples", 600, "test examples scored after training")
_WORKFLOW_EXAMPLES = flags.DEFINE_integer(
  "workflow_examples", 0, "test examples for the workflow table (0: none)"
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "saved weights' dtype")


def pretrain_config(config, phase: str) -> pretrain.PretrainConfig:
  """`config.pretrain`, with `config.pretrain_more[phase]` over it for a later phase."""
  overrides = {}
  if phase != "phase1":
    more = config.get("pretrain_more") or {}
    if phase not in more:
      raise app.UsageError(f"--phase={phase}: expected phase1 or one of {sorted(more)}")
    overrides = more[phase].to_dict()
  return pretrain.PretrainConfig.from_dict({**config.pretrain.to_dict(), **overrides})


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  out = _OUT.value
  config = pretrain_config(_CONFIG.value, _PHASE.value)
  pretrain.pretrain_and_save(config, out, _TEST_EXAMPLES.value, _DTYPE.value)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(f"saved to {out} ({size / 1e6:.2f} MB)")
  if _WORKFLOW_EXAMPLES.value:
    from psynth_jax import load_pretrained
    from psynth_jax.eval import compare

    task = synthetic.TASK
    problems = task.load(split="test", limit=_WORKFLOW_EXAMPLES.value, seed=pretrain.EVAL_SEED)
    lm = pretrain.language_model(load_pretrained(out).params)
    report = compare.compare_modes(lm, task, problems, lengths=(), ttft_examples=4)
    print(compare.format_table(report))


if __name__ == "__main__":
  app.run(main)
