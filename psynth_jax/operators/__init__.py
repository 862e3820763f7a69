"""Merge operators (`base.py` has the interface); importing this package registers each."""

from psynth_jax.operators import ape, links, recompute, reencode, reprefill, sequential
from psynth_jax.operators.ape import APE
from psynth_jax.operators.base import MergeOperator, create, from_spec, names, parse_spec, register
from psynth_jax.operators.links import Links
from psynth_jax.operators.recompute import Recompute
from psynth_jax.operators.reencode import Reencode, resolve, wrapping
from psynth_jax.operators.reprefill import Reprefill
from psynth_jax.operators.sequential import Sequential

__all__ = [
  "APE",
  "Links",
  "MergeOperator",
  "Recompute",
  "Reencode",
  "Reprefill",
  "Sequential",
  "create",
  "from_spec",
  "names",
  "parse_spec",
  "register",
  "resolve",
  "wrapping",
]
del ape, links, recompute, reencode, reprefill, sequential
