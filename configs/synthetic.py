"""Distillation training on the built-in synthetic suite, on a CPU.

Run (from the repository root):

  python experiments/train.py --config configs/synthetic.py:tiny --workdir /tmp/psynth/synthetic_tiny

The same file drives the whole from-scratch reproduction (base model, every
adapter, evaluation): `python experiments/reproduce_synthetic.py --config
configs/synthetic.py` reads its `pretrain`, `pretrain_more` (phase2, phase3) and `reproduce` blocks as well.

Arguments after the colon (tiny, random, kl, fast): see `psynth_jax.train.synthetic_config`,
which builds the config so that notebooks get the same one.

Every field can be overridden on the command line, e.g.
`--config.train.trainable=lora_only --config.train.num_steps=50`.
The traces are the suite's own examples with gold targets; to distil the base
model's text-synthesis outputs instead, write them with experiments/make_traces.py
and pass `--config.data.source=jsonl --config.data.train_jsonl=PATH`.
"""

from psynth_jax.train.synthetic_config import get_config

__all__ = ["get_config"]
