"""Distillation training on the built-in synthetic suite, on a CPU.

Run (from the repository root):

  python experiments/train.py --config configs/synthetic.py:tiny --workdir /tmp/psynth/synthetic_tiny

The same file drives the whole from-scratch reproduction (base model, every
adapter, evaluation): `python experiments/reproduce_synthetic.py --config
configs/synthetic.py` reads `pretrain` and `reproduce` below as well.

Arguments after the colon, comma-separated:
  tiny     the shipped word-level base model (psynth_jax/assets/synthetic_base)
  random   a random 2-layer model over the suite vocabulary instead (tests, smoke runs; no files needed)
  kl       add the token-level KL to the text-concatenation teacher (weight 0.5)
  fast     cheap XLA compilation (CPU), for tests

Every field can be overridden on the command line, e.g.
`--config.train.trainable=lora_only --config.train.num_steps=50`.
The traces are the suite's own examples with gold targets; to distil the base
model's text-synthesis outputs instead, write them with experiments/make_traces.py
and pass `--config.data.source=jsonl --config.data.train_jsonl=PATH`.
"""

from psynth_jax.train.synthetic_config import get_config

__all__ = ["get_config"]
