"""The paper's operator: re-encode every branch to the shared start, map, merge.

`Reencode(mapper=None)` is the naive merge; with a mapper it is Parallel-Synthesis
(the paper's `affine` mapper, our per-head `head_affine`, any kind in
`psynth_jax.mapper.kinds()`). The arithmetic is `psynth_jax.merge`; this module only
gives it the operator interface and its FLOP count.
"""

from __future__ import annotations

import jax

from psynth_jax import merge as merge_lib
from psynth_jax import pytree
from psynth_jax.mapper import Mapper, check_mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.operators.base import MergeOperator, register

ROPE_FLOPS = 3  # per key element: x cos + rotate(x) sin
AFFINE_FLOPS = 2  # per key or value element: a x + b
STATS_FLOPS = 2  # per key or value element: the mean-norm statistics (square, add)


def stored_elements(config: ModelConfig, branches) -> int:
  """Key (or value) elements of every stored branch row, all layers: what a merge reads."""
  k, s = branches.num_branches, branches.capacity
  return k * s * config.num_kv_heads * config.head_dim * config.num_layers


def mapper_flops(config: ModelConfig, mapper: Mapper | None, branches) -> float:
  """FLOPs of applying `mapper` (0 for none / the identity); its small MLP is not counted."""
  if mapper is None or mapper.is_identity:
    return 0.0
  elements = stored_elements(config, branches)
  stats = 2 * STATS_FLOPS * elements if mapper.module().needs_stats else 0
  return float(2 * AFFINE_FLOPS * elements + stats)


@register("reencode")
@pytree.dataclass
class Reencode(MergeOperator):
  """Re-encoding to the shared start + an optional mapper (None: the naive merge)."""

  mapper: Mapper | None = None

  @classmethod
  def create(cls, config: ModelConfig, mapper: str | Mapper | None = None, seed: int = 0):
    """`mapper`: a `Mapper`, a registered kind (made fresh: the identity at init), or None."""
    if isinstance(mapper, str):
      mapper = Mapper.create(mapper, config.num_layers, seed=seed)
    op = cls(mapper)
    op.check(config)
    return op

  @property
  def name(self) -> str:
    if self.mapper is None or self.mapper.is_identity:
      return "naive_merge"
    return f"reencode/{self.mapper.kind}"

  def merge(self, params, branches, *, rows, capacity, num_workers=None):
    return merge_lib.merge(branches, params.config, self.mapper, rows, capacity, num_workers)

  def flops(self, config: ModelConfig, branches) -> float:
    rope = ROPE_FLOPS * stored_elements(config, branches)
    return float(rope) + mapper_flops(config, self.mapper, branches)

  def check(self, config: ModelConfig) -> None:
    check_mapper(self.mapper, config.num_layers)

  def own_params(self) -> Reencode | None:
    """The operator's trainable arrays besides its mapper (this operator with the mapper
    taken out), or None where it has none: what the trainer learns next to the mapper."""
    rest = self.replace(mapper=None)
    return rest if jax.tree.leaves(rest) else None


def wrapping(spec: str, config: ModelConfig, mapper):
  """`mapper` inside the operator `spec` names (the trainer's and an export's way to train
  and run a mapper under another operator); "" gives the mapper itself."""
  if not spec:
    return mapper
  from psynth_jax.operators.base import from_spec

  op = from_spec(spec, config)
  if not isinstance(op, Reencode):
    raise ValueError(f"operator {spec!r} takes no mapper")
  return op.replace(mapper=mapper)


def resolve(mapper=None, merge: MergeOperator | None = None) -> MergeOperator:
  """The operator a call asks for: `merge`, else the paper's with `mapper` (the shorthand:
  `mapper=m` is `merge=Reencode(m)`, `mapper=None` the naive merge)."""
  if mapper is not None and merge is not None:
    _both()
  if isinstance(mapper, MergeOperator):  # an operator in a mapper's place (a loaded export)
    return mapper
  if merge is None:
    return Reencode(mapper)
  if not isinstance(merge, MergeOperator):
    raise TypeError(f"merge= takes a MergeOperator (psynth_jax.operators), got {type(merge)}")
  return merge


def _both():
  raise ValueError("give mapper= or merge=, not both (a mapper is merge=Reencode(mapper))")
