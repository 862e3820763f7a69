"""The compiled programs of a `CacheSession` (`psynth_jax.agents.session`).

Each takes the session's cache donated where it continues one, so a conversation's cache
(and a latent session's merged prefix) is one buffer, updated in place, never copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import decode
from psynth_jax.kv_cache import KVCache
from psynth_jax.merge import merge, synth_start_position
from psynth_jax.model.transformer import hidden_states


def banned_ids(banned, batch: int, vocab_size: int) -> jax.Array | None:
  """Per-row ids never sampled -> [B, M] int32 padded with V (`decode.DecodeState.banned`);
  None where no row bans anything (the programs without a ban)."""
  if banned is None or not any(banned):
    return None
  if len(banned) != batch:
    raise ValueError(f"{len(banned)} banned-id lists for a batch of {batch}")
  width = max(len(b) for b in banned)
  out = np.full((batch, width), vocab_size, np.int32)
  for row, ids in enumerate(banned):
    if any(not 0 <= int(i) < vocab_size for i in ids):
      raise ValueError(f"banned ids {list(ids)} outside the vocabulary of {vocab_size}")
    out[row, : len(ids)] = ids
  return jnp.asarray(out)


@functools.partial(jax.jit, static_argnames=("spec", "capacity"))
def begin_text(params, tokens, positions, mask, rng, lora, spec, capacity, banned=None):
  cache = KVCache.empty(params.config, tokens.shape[0], capacity)
  logits, cache = decode.prefill(params, tokens, positions, mask, cache, lora)
  return decode.start(logits, positions[:, -1] + 1, cache, rng, spec, banned), logits


@functools.partial(jax.jit, static_argnames=("spec", "rows", "capacity"))
def begin_latent(
  params,
  branches,
  tokens,
  positions,
  mask,
  mapper,
  lora,
  num_workers,
  rng,
  spec,
  rows,
  capacity,
  banned=None,
):
  cache = merge(branches, params.config, mapper, rows, capacity, num_workers)
  positions = positions + synth_start_position(branches)
  logits, cache = decode.prefill(params, tokens, positions, mask, cache, lora)
  return decode.start(logits, positions[:, -1] + 1, cache, rng, spec, banned), logits


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def continue_(params, cache, tokens, positions, mask, rng, lora, spec, banned=None):
  logits, cache = decode.prefill(params, tokens, positions, mask, cache, lora)
  state = decode.start(logits, positions[:, -1] + 1, cache, rng, spec, banned)
  # A conversation sitting the turn out (no real input) is done from the start, so that it
  # does not keep the decode loop running.
  return state.replace(done=state.done | ~mask.any(axis=1)), logits


@functools.partial(jax.jit, donate_argnames=("cache",))
def write(params, cache, tokens, positions, mask, lora):
  return hidden_states(params, tokens, positions, cache, mask, lora)[1]


@functools.partial(jax.jit, donate_argnames=("cache",))
def invalidate(cache: KVCache, first: jax.Array, end: jax.Array) -> KVCache:
  """Marks rows [first_b, end) of each conversation b invalid (slots it did not use)."""
  rows = jnp.arange(cache.valid.shape[1])[None, :]
  unused = (rows >= first[:, None]) & (rows < end)
  return cache.replace(valid=cache.valid & ~unused)


@jax.jit
def take_rows(cache: KVCache, b: jax.Array, rows: jax.Array):
  """Rows [S] of conversation b: (k, v: L x [G, S, H], positions [S])."""
  k = tuple(x[b][:, rows] for x in cache.k)
  v = tuple(x[b][:, rows] for x in cache.v)
  return k, v, cache.positions[b, rows]
