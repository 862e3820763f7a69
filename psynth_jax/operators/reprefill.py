"""Re-prefill: each branch's output tokens encoded again alone, without its worker's prompt.

A worker's output rows were computed after its prompt, so they attend to it; the binding
probe (`psynth_jax.eval.probe`) finds that a tool value's row then says far less about
its item than when the branch text is encoded alone. This operator re-prefills every
branch's tokens (`Branches.tokens`) from position 0 with the base model, independently
per branch (one batched prefill over K), and merges those rows as the paper does
(mapper included). It is what `encode_branches` of the outputs would have given: the
worker prompts' context is dropped. Order-free. Costs a prefill of every branch token
(no cross-branch attention, unlike `recompute` at fraction 1). Single-turn branches only:
multi-turn branches keep gaps between their turns that a re-prefill would close.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from psynth_jax import pytree
from psynth_jax.kv_cache import KVCache
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import hidden_states
from psynth_jax.operators.base import register
from psynth_jax.operators.reencode import Reencode


def standalone(params, branches):
  """The same branches with every row recomputed from its tokens alone, at positions 0.."""
  if branches.spans is not None:
    raise NotImplementedError("reprefill: multi-turn branches (spans) are not re-prefilled")
  k, s = branches.tokens.shape
  valid = jnp.arange(s)[None, :] < branches.lengths[:, None]
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (k, s))
  _, cache = hidden_states(
    params, branches.tokens, positions, KVCache.empty(params.config, k, s), valid
  )
  return branches.replace(cache=cache, offsets=jnp.zeros_like(branches.offsets))


@register("reprefill")
@pytree.dataclass
class Reprefill(Reencode):
  @property
  def name(self) -> str:
    inner = super().name
    return "reprefill" if inner == "naive_merge" else f"reprefill/{self.mapper.kind}"

  def merge(self, params, branches, *, rows, capacity, num_workers=None):
    fresh = standalone(params, branches)
    return super().merge(params, fresh, rows=rows, capacity=capacity, num_workers=num_workers)

  def flops(self, config: ModelConfig, branches) -> float:
    from psynth_jax.eval.ttft import prefill_flops

    head = 2 * config.hidden_size * config.vocab_size  # no unembedding in the re-prefill
    lengths = np.asarray(branches.lengths).tolist()
    prefill = sum(prefill_flops(config, n, 0) - head for n in lengths if n)
    return super().flops(config, branches) + prefill
