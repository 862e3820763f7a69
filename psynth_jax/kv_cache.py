"""The explicit key/value cache pytree.

Conventions (axis letters): B batch, L layers, S cache rows, G kv heads,
H head dim.

* `k[l]`, `v[l]`: layer l's keys and values, `[B, G, S, H]`. Keys are stored
  *after* RoPE at `positions`, so a row carries its position with it. Heads come
  before rows so that attention reads a prefix of rows per (batch, kv head) as one
  [S, H] matrix: stored [B, S, G, H], XLA:CPU transposed the prefix it read into that
  layout on every decode step (RESULTS.md, "KV cache layout").
* `positions`: `[B, S]` int32, the RoPE position of each row.
* `valid`: `[B, S]` bool, rows that hold a real token (False for padding and
  for rows not yet written).
* `index`: scalar int32, the next row to write; shared by the batch (prompts
  of different lengths are left-padded so that they all end on the same row).
* `bias`: None, or `[B, S]` float32 added to every query's attention score of
  each row (a merge operator's reweighting of branch rows, `operators/ape.py`;
  rows written later get 0).

Attention over a cache uses the *row order* for causality (a query written at
row r sees valid rows <= r) and `positions` only for RoPE. That is what lets
a merged cache of K branches, all starting at position 0, sit in rows before
the synthesizer's own tokens and be fully visible to them.

A stack of K branch caches is the same type whose batch axis is the branch
axis K (see `psynth_jax.workers.Branches`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from psynth_jax import pytree
from psynth_jax.model.config import ModelConfig


@pytree.dataclass
class KVCache:
  k: tuple[jax.Array, ...]  # L x [B, G, S, H]
  v: tuple[jax.Array, ...]  # L x [B, G, S, H]
  positions: jax.Array  # [B, S] int32
  valid: jax.Array  # [B, S] bool
  index: jax.Array  # [] int32, next row to write
  bias: jax.Array | None = None  # [B, S] float32 score bias per row, or None (0)

  @classmethod
  def empty(cls, config: ModelConfig, batch: int, capacity: int) -> KVCache:
    dtype = jnp.dtype(config.dtype)
    shape = (batch, config.num_kv_heads, capacity, config.head_dim)
    return cls(
      k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
      v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
      positions=jnp.zeros((batch, capacity), jnp.int32),
      valid=jnp.zeros((batch, capacity), bool),
      index=jnp.zeros((), jnp.int32),
    )

  @property
  def batch(self) -> int:
    return self.valid.shape[0]

  @property
  def capacity(self) -> int:
    return self.valid.shape[1]

  @property
  def num_layers(self) -> int:
    return len(self.k)

  def lengths(self) -> jax.Array:
    """Number of valid rows per sequence, [B]."""
    return self.valid.sum(axis=-1).astype(jnp.int32)

  def check_compatible(self, config: ModelConfig) -> None:
    """Raises ValueError if this cache was not made by a model with `config`."""
    want = (config.num_layers, config.num_kv_heads, config.head_dim, jnp.dtype(config.dtype))
    _, g, _, h = self.k[0].shape
    got = (self.num_layers, g, h, self.k[0].dtype)
    if want != got:
      raise ValueError(
        "KV cache does not match the model: (layers, kv_heads, head_dim, dtype)"
        f" is {got} in the cache but {want} in the model config"
      )


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
  """Rows `rows` [B, R] of each sequence of one layer's keys or values [B, G, S, H]
  -> [B, G, R, H]."""
  return jnp.take_along_axis(x, rows[:, None, :, None], axis=2)
