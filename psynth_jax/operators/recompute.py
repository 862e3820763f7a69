"""Selective recompute (CacheBlend-style): refresh the keys/values of a fraction of branch tokens.

Branches are encoded independently, so no branch row has seen the other branches.
This operator recomputes a fraction `fraction` of the merged branch tokens so that
they do, and reuses the rest (re-encoded, as in `reencode`):

1. Merge as the paper does (shared start, positions t within each branch).
2. Select (CacheBlend's criterion): run the first `select_layer + 1` layers over
   all merged tokens, each attending causally to the tokens before it in merged-row
   order (branch 0, then branch 1, ...), and rank tokens by how far their keys and
   values at layer `select_layer` move from the reused ones (squared L2 over heads).
   Layer 0's keys do not depend on context, so the ranking starts at layer 1.
3. Recompute: the ceil(fraction * n) top tokens go through every layer, each
   attending causally in merged-row order to every branch row before it (reused
   rows for the others, recomputed rows for the selected); their new keys/values
   replace the reused ones in place.

`fraction = 0` is the paper's path (nothing recomputed, the mapper applied as in
`reencode`); `fraction = 1` equals a forward of the concatenated branch tokens at
the Parallel-Synthesis positions (no worker prompts, no `[Worker i]` framing).
A mapper, if given, maps the reused rows only: recomputed rows are the model's own.
Order-dependent: which tokens see which depends on the merged-row order, so
permuting the branches changes the result (for 0 < fraction).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import merge as merge_lib
from psynth_jax import pytree
from psynth_jax.kv_cache import KVCache
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import hidden_states
from psynth_jax.operators.base import register
from psynth_jax.operators.reencode import Reencode


def recompute_slots(fraction: float, rows: int) -> int:
  """Static slots for recomputed tokens: ceil(fraction * rows) (rows >= the real tokens)."""
  return min(rows, math.ceil(fraction * rows))


def _deviation(params, cache: KVCache, tokens, positions, valid, layer: int) -> jax.Array:
  """[rows] squared L2 distance of each token's layer-`layer` keys + values, recomputed
  causally over all merged tokens, from the reused ones; -inf where not a token."""
  rows = tokens.shape[0]
  fresh = KVCache.empty(params.config, 1, rows)
  _, fresh = hidden_states(
    params, tokens[None], positions[None], fresh, valid[None], num_layers=layer + 1
  )

  def dist(a, b):  # [1, G, S, H] -> [S]
    d = a[0, :, :rows].astype(jnp.float32) - b[0, :, :rows].astype(jnp.float32)
    return (d * d).sum(axis=(0, 2))

  dev = dist(fresh.k[layer], cache.k[layer]) + dist(fresh.v[layer], cache.v[layer])
  return jnp.where(valid, dev, -jnp.inf)


@register("recompute")
@pytree.dataclass
class Recompute(Reencode):
  """Reencode + CacheBlend-style recompute of a fraction of the branch tokens."""

  fraction: float = pytree.field(static=True, default=0.15)
  select_layer: int = pytree.field(static=True, default=1)

  order_free = False

  @classmethod
  def create(cls, config, mapper=None, seed=0, fraction: float = 0.15, select_layer: int = 1):
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f"fraction={fraction} must be in [0, 1]")
    if not 0 <= select_layer < config.num_layers:
      raise ValueError(f"select_layer={select_layer} must be a layer of the {config.num_layers}")
    base = Reencode.create(config, mapper, seed)
    return cls(base.mapper, float(fraction), int(select_layer))

  @property
  def name(self) -> str:
    return f"recompute/{self.fraction:g}"

  def merge(self, params, branches, *, rows, capacity, num_workers=None):
    slots = recompute_slots(self.fraction, rows)
    if slots == 0:
      return super().merge(params, branches, rows=rows, capacity=capacity, num_workers=num_workers)
    # Room after the branch rows for the recomputed tokens while they run.
    work = super().merge(
      params, branches, rows=rows, capacity=rows + slots, num_workers=num_workers
    )
    tokens = merge_lib.packed(branches.tokens, branches.lengths, rows)[0]
    chosen, use = self.selected(params, work, tokens, rows)
    positions, valid = work.positions[0, :rows], work.valid[0, :rows]
    picked = jnp.minimum(chosen, rows - 1)
    # The chosen rows leave the reused cache; they come back as the recomputed tokens.
    keep = valid & ~jnp.zeros(rows, bool).at[chosen].set(True, mode="drop")
    work = work.replace(valid=work.valid.at[0, :rows].set(keep))
    row_order = jnp.concatenate([jnp.arange(rows), jnp.where(use, chosen, rows + slots)])
    _, work = hidden_states(
      params,
      tokens[picked][None],
      positions[picked][None],
      work,
      use[None],
      row_order=row_order[None],
    )

    def place(x):  # [1, G, rows + slots, H]: slot j's rows back to row chosen[j]
      merged = x[0, :, :rows].at[:, chosen].set(x[0, :, rows:], mode="drop")
      return jnp.pad(merged, ((0, 0), (0, capacity - rows), (0, 0)))[None]

    return KVCache(
      k=tuple(place(x) for x in work.k),
      v=tuple(place(x) for x in work.v),
      positions=jnp.pad(positions, (0, capacity - rows))[None],
      valid=jnp.pad(valid, (0, capacity - rows))[None],
      index=jnp.asarray(rows, jnp.int32),
    )

  def selected(self, params, work: KVCache, tokens, rows: int):
    """The recomputed rows in merged order, [slots] (unused slots = rows), and which are used.

    `work` is the paper's merged cache (rows [0, rows) the branches), `tokens` [rows]
    the merged branch tokens.
    """
    slots = recompute_slots(self.fraction, rows)
    valid = work.valid[0, :rows]
    wanted = jnp.ceil(self.fraction * valid.sum()).astype(jnp.int32)
    if self.fraction == 1.0:  # every token: nothing to rank
      order = jnp.arange(rows)
    else:
      positions = work.positions[0, :rows]
      dev = _deviation(params, work, tokens, positions, valid, self.select_layer)
      order = jax.lax.top_k(dev, slots)[1]
    chosen = jnp.sort(jnp.where(jnp.arange(slots) < wanted, order[:slots], rows))
    return chosen, chosen < rows

  def flops(self, config: ModelConfig, branches) -> float:
    from psynth_jax.eval.ttft import prefill_flops

    total = int(np.asarray(branches.lengths).sum())
    n = math.ceil(self.fraction * total)
    if n == 0:
      return super().flops(config, branches)
    # The selection pass: select_layer + 1 of L layers over every token (no unembedding).
    head = 2 * config.hidden_size * config.vocab_size
    select = 0.0
    if self.fraction < 1.0:
      select = (prefill_flops(config, total, 0) - head) * (self.select_layer + 1)
      select /= config.num_layers
    # The recompute: n tokens through every layer over the rows before them (at most all).
    recompute = prefill_flops(config, n, total - n) - head
    return super().flops(config, branches) + select + recompute
