"""Re-encode, map and merge K branch caches into one synthesizer cache.

1. Re-encoding: branch i's keys were rotated at their stored positions
   (`cache.positions`); rotating them by -offsets[i] moves every row of branch i
   by the same amount, so that every branch starts at the same branching point.
   RoPE rotations compose, so this equals recomputing the keys at the new
   positions (up to float rounding). Values are untouched. Each layer rotates
   with its own RoPE table (Gemma 3's local and global bases differ).
   * single-turn branches (`Branches.spans` None): rows sit at offsets[i] + t,
     so they land at t in [0, len_i);
   * multi-turn branches (`spans` set, `psynth_jax.agents.memory`): each row
     lands at its stored position - offsets[i]; kept turn outputs keep the
     prompt / tool-response gaps between them, and the branch covers
     [0, span_i) with span_i = its last position + 1.
2. Mapping: `psynth_jax.mapper` coefficients, per branch and layer; the length
   feature is the span (= len_i for a single turn).
3. Merging: the valid rows of all branches are packed, in branch order, into
   rows [0, sum_i len_i) of a fresh cache; the synthesizer's own tokens follow
   from row `rows` on, at positions max_i span_i + j. Attention treats all
   branch rows alike (fully visible, order-free), so the synthesizer's view does
   not depend on branch order.

The single-turn path is the formula the method defines (positions = the row
index t within a branch, start = max_i len_i); multi-turn branches read the
stored positions and spans instead, which for single-turn rows are the same
numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from psynth_jax.kv_cache import KVCache
from psynth_jax.mapper import Mapper, apply, check_mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.rope import apply_rope, inv_frequencies


def reencode(
  k: jax.Array, offsets: jax.Array, config: ModelConfig, layer: int | None = None
) -> jax.Array:
  """Rotates keys [K, G, S, H] by -offsets [K] (every row of branch i alike), with
  `layer`'s own RoPE table (Gemma 3: local and global layers differ; None: the global)."""
  shift = -offsets[:, None]  # [K, 1]: one angle per branch, broadcast over heads and rows
  return apply_rope(k, shift, inv_frequencies(config, layer))


def mapped_branch_kv(branches, config: ModelConfig, mapper: Mapper | None, num_workers=None):
  """Re-encoded and mapped branch keys/values: two tuples of L x [K, G, S, H]."""
  k = tuple(reencode(kl, branches.offsets, config, i) for i, kl in enumerate(branches.cache.k))
  v = branches.cache.v
  if mapper is not None and not mapper.is_identity:
    check_mapper(mapper, config.num_layers)
    if num_workers is None:
      num_workers = jnp.asarray(branches.num_branches)
    coeffs = mapper.coefficients(k, v, branches.lengths, num_workers, branches.spans)
    k, v = apply(coeffs, k, v)
  return k, v


def merge(
  branches, config: ModelConfig, mapper: Mapper | None, rows: int, capacity: int, num_workers=None
) -> KVCache:
  """One example's branches -> a batch-1 cache of `capacity` rows, branch rows packed first.

  Args:
    branches: `Branches` with K branches (rows [0, len_i) valid in each).
    config: the model config (RoPE variant).
    mapper: a `Mapper` or None (identity).
    rows: static number of rows reserved for branches; must be >= sum of
      lengths (not checkable under jit: callers check it on the host, as
      `synthesis.branch_rows` and the training batcher do).
    capacity: total rows (>= rows), the rest left for the synthesizer's tokens.
    num_workers: K as the mapper sees it (default: the number of branches,
      empty ones included: an empty branch adds no rows but still counts).

  Returns:
    KVCache [1, capacity] with valid rows [0, sum_i len_i), and `index` = rows
    (where the synthesizer prompt is written). Positions: t within each branch
    (single-turn), or each row's stored position - offsets[i] (multi-turn).
  """
  k, v = mapped_branch_kv(branches, config, mapper, num_workers)
  branch, local, valid = packed_rows(branches.lengths, rows, branches.capacity)
  if branches.spans is None:
    position = local
  else:
    position = branches.cache.positions[branch, local] - branches.offsets[branch]

  def gather(x):  # [K, G, S, H] -> [1, G, capacity, H]
    rows_first = x[branch, :, local]  # [rows, G, H]: the advanced indices' axis leads
    return jnp.pad(rows_first, ((0, capacity - rows), (0, 0), (0, 0))).transpose(1, 0, 2)[None]

  return KVCache(
    k=tuple(gather(kl) for kl in k),
    v=tuple(gather(vl) for vl in v),
    positions=jnp.pad(jnp.where(valid, position, 0), (0, capacity - rows))[None].astype(jnp.int32),
    valid=jnp.pad(valid, (0, capacity - rows))[None],
    index=jnp.asarray(rows, jnp.int32),
  )


def packed_rows(lengths: jax.Array, rows: int, capacity: int):
  """Where merged row r comes from: (branch [rows], row within it [rows], valid [rows]).

  The valid rows of all branches are packed in branch order; rows past sum_i len_i
  are invalid (their indices point at a real row, to stay in bounds).
  """
  starts = jnp.cumsum(lengths) - lengths  # [K]
  total = lengths.sum()
  r = jnp.arange(rows)
  branch = jnp.clip(jnp.searchsorted(jnp.cumsum(lengths), r, side="right"), 0, lengths.shape[0] - 1)
  local = jnp.clip(r - starts[branch], 0, capacity - 1)
  return branch, local, r < total


def packed(x: jax.Array, lengths: jax.Array, rows: int) -> jax.Array:
  """Per-branch rows x [K, S, ...] (e.g. `Branches.tokens`) -> merged [1, rows, ...]."""
  branch, local, _ = packed_rows(lengths, rows, x.shape[1])
  return x[branch, local][None]


def synth_start_position(branches) -> jax.Array:
  """The synthesizer prompt starts at position max_i span_i (max_i len_i for one turn)."""
  return branches.span.max()
