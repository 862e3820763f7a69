"""Sequential positions: branches laid end to end instead of all starting at 0.

An ablation of the paper's shared start. Branch i is re-encoded to start where
branch i - 1 ends (at sum_{j<i} span_j), so the merged rows sit at distinct
positions as if the branches had been one text, and the synthesizer starts at
sum_i span_i. Order-dependent: permuting the branches moves them (and RoPE sees
the new distances). The mapper, if any, reads the same features as in `reencode`
(each branch's own span), so K = 1 is exactly the shared-start path.
"""

from __future__ import annotations

import jax.numpy as jnp

from psynth_jax import pytree
from psynth_jax.operators.base import register
from psynth_jax.operators.reencode import Reencode


def laid_end_to_end(branches):
  """The same branches, each with its offset moved back by the spans before it.

  Merging reads multi-turn rows at stored position - offset, so lowering branch
  i's offset by s_i = sum_{j<i} span_j lands its rows at s_i + (their shared-start
  position); the key rotation (by -offset) follows the same numbers.
  """
  spans = branches.span
  before = jnp.cumsum(spans) - spans
  b = branches.with_spans()
  return b.replace(offsets=(b.offsets - before).astype(b.offsets.dtype))


@register("sequential")
@pytree.dataclass
class Sequential(Reencode):
  order_free = False

  @property
  def name(self) -> str:
    inner = super().name
    return "sequential" if inner == "naive_merge" else f"sequential/{self.mapper.kind}"

  def merge(self, params, branches, *, rows, capacity, num_workers=None):
    return super().merge(
      params, laid_end_to_end(branches), rows=rows, capacity=capacity, num_workers=num_workers
    )

  def start(self, branches):
    return branches.span.sum()
