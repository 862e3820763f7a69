"""Prefill and decode: one `lax.while_loop` over a documented state, plus a step loop.

Conventions:
* Prompts of different lengths are **left-padded** to a common length bucket,
  so every sequence writes its next token to the same cache row
  (`KVCache.index`) while RoPE positions stay per-sequence (`DecodeState.position`).
* The first new token is sampled from the prefill logits; each loop iteration
  then feeds the previous token through the model and samples the next one.
  A sequence is done after it emits a stop id; later slots hold `pad_id`.
* `decode_loop` (fused, `lax.while_loop`) and `step_loop` (Python, streaming)
  run the very same `decode_step`, so they produce the same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import pytree
from psynth_jax.kv_cache import KVCache
from psynth_jax.model.transformer import Params, hidden_states, unembed


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How to pick tokens (static under jit). temperature 0 means greedy."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf. [B, V] -> [B, V]."""
  if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None and sampling.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < p (the top token always stays).
    keep = (jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Picks one token per row of float32 logits [B, V] -> [B] int32."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / sampling.temperature, sampling)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@pytree.dataclass
class DecodeState:
  """Everything the decode loop carries.

  Attributes:
    tokens: [B, T] int32, generated tokens so far (pad_id beyond `step`/after stop).
    step: [] int32, number of slots of `tokens` filled.
    last: [B] int32, the most recent token (the next model input).
    position: [B] int32, RoPE position of `last`.
    done: [B] bool, sequence has emitted a stop id.
    cache: the KV cache, holding everything before `last`.
    rng: PRNG key for sampling.
    banned: None, or [B, M] int32 ids row b never samples (V pads a row: no id); an agent's
      last turn bans the tool-call opener (`agents.react`).
  """

  tokens: jax.Array
  step: jax.Array
  last: jax.Array
  position: jax.Array
  done: jax.Array
  cache: KVCache
  rng: jax.Array
  banned: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static decode settings (a jit key)."""

  max_new_tokens: int
  sampling: Sampling = Sampling()
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0


def _record(state: DecodeState, token: jax.Array, spec: DecodeSpec) -> DecodeState:
  """Writes `token` [B] into slot `state.step`, marking sequences that stop."""
  token = jnp.where(state.done, spec.pad_id, token)
  tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
  is_stop = jnp.isin(token, jnp.asarray(spec.stop_ids, jnp.int32)) if spec.stop_ids else False
  return state.replace(
    tokens=tokens,
    step=state.step + 1,
    last=token,
    done=state.done | is_stop,
  )


def without_banned(logits: jax.Array, banned: jax.Array | None) -> jax.Array:
  """[B, V] logits with row b's `banned[b]` ids at -inf (ids >= V are padding)."""
  if banned is None:
    return logits
  rows = jnp.arange(logits.shape[0])[:, None]
  return logits.at[rows, banned].set(-jnp.inf, mode="drop")


def start(
  first_logits: jax.Array,  # [B, V] logits of the last prompt token
  next_position: jax.Array,  # [B] position of the first new token
  cache: KVCache,
  rng: jax.Array,
  spec: DecodeSpec,
  banned: jax.Array | None = None,  # [B, M] ids never sampled (`DecodeState.banned`)
) -> DecodeState:
  """Samples the first token from prefill logits and builds the loop state."""
  b = first_logits.shape[0]
  rng, key = jax.random.split(rng)
  state = DecodeState(
    tokens=jnp.full((b, spec.max_new_tokens), spec.pad_id, jnp.int32),
    step=jnp.zeros((), jnp.int32),
    last=jnp.zeros((b,), jnp.int32),
    position=next_position.astype(jnp.int32),
    done=jnp.zeros((b,), bool),
    cache=cache,
    rng=rng,
    banned=banned,
  )
  return _record(state, sample(without_banned(first_logits, banned), key, spec.sampling), spec)


def decode_step(params: Params, state: DecodeState, spec: DecodeSpec, lora=None) -> DecodeState:
  """Feeds `state.last` through the model and records the next token."""
  x, cache = hidden_states(
    params, state.last[:, None], state.position[:, None], state.cache, None, lora
  )
  logits = unembed(params, x, lora)[:, 0]
  rng, key = jax.random.split(state.rng)
  state = state.replace(cache=cache, rng=rng, position=state.position + 1)
  return _record(state, sample(without_banned(logits, state.banned), key, spec.sampling), spec)


def _running(state: DecodeState, spec: DecodeSpec) -> jax.Array:
  return (state.step < spec.max_new_tokens) & ~jnp.all(state.done)


def decode_loop(params: Params, state: DecodeState, spec: DecodeSpec, lora=None) -> DecodeState:
  """Runs `decode_step` in a `lax.while_loop` until every sequence stops or is full."""
  return jax.lax.while_loop(
    lambda s: _running(s, spec),
    lambda s: decode_step(params, s, spec, lora),
    state,
  )


jit_decode_loop = jax.jit(decode_loop, static_argnames=("spec",), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("state",))
def jit_decode_step(params: Params, state: DecodeState, spec: DecodeSpec, lora=None):
  return decode_step(params, state, spec, lora)


def step_loop(
  params: Params, state: DecodeState, spec: DecodeSpec, lora=None
) -> Iterator[DecodeState]:
  """Python loop over the same `decode_step` (streaming, tests). Yields each state."""
  yield state
  while bool(_running(state, spec)):
    state = jit_decode_step(params, state, spec, lora)
    yield state


# ---------------------------------------------------------------------------
# Prompt batching: left padding into length buckets.


def bucket(n: int, minimum: int = 16) -> int:
  """Rounds a length up to a bucket so that new lengths rarely compile a new program.

  Steps of 16 up to 128, 64 up to 1024, then 256: at most ~12% padding above
  128 tokens (padding is computed, so coarse buckets cost real time).
  """
  n = max(n, minimum)
  step = 16 if n <= 128 else 64 if n <= 1024 else 256
  return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class PromptBatch:
  tokens: np.ndarray  # [B, T] int32, left-padded
  positions: np.ndarray  # [B, T] int32 (0 for padding)
  mask: np.ndarray  # [B, T] bool, False for padding
  lengths: np.ndarray  # [B] int32, true prompt lengths


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0) -> PromptBatch:
  """Left-pads token lists to `length` (raises if a prompt is empty or longer)."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if len(prompts) == 0:
    raise ValueError("no prompts given")
  if lengths.min() == 0:
    raise ValueError(f"prompt {int(lengths.argmin())} is empty")
  if lengths.max() > length:
    raise ValueError(f"a prompt has {lengths.max()} tokens, more than the padded length {length}")
  b = len(prompts)
  tokens = np.full((b, length), pad_id, np.int32)
  mask = np.zeros((b, length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p) :] = p
    mask[i, length - len(p) :] = True
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return PromptBatch(tokens, positions, mask, lengths)


def prefill(
  params: Params,
  tokens: jax.Array,
  positions: jax.Array,
  mask: jax.Array,
  cache: KVCache,
  lora=None,
) -> tuple[jax.Array, KVCache]:
  """Writes a left-padded prompt batch into the cache; returns last-token logits [B, V]."""
  x, cache = hidden_states(params, tokens, positions, cache, mask, lora)
  return unembed(params, x[:, -1:], lora)[:, 0], cache


def begin(
  params: Params,
  batch_tokens: jax.Array,  # [B, T] left-padded
  batch_positions: jax.Array,  # [B, T]
  batch_mask: jax.Array,  # [B, T]
  rng: jax.Array,
  spec: DecodeSpec,
  capacity: int,
  lora=None,
) -> DecodeState:
  """Prefills a fresh cache of `capacity` rows and samples the first token."""
  cache = KVCache.empty(params.config, batch_tokens.shape[0], capacity)
  logits, cache = prefill(params, batch_tokens, batch_positions, batch_mask, cache, lora)
  return start(logits, batch_positions[:, -1] + 1, cache, rng, spec)


jit_begin = jax.jit(begin, static_argnames=("spec", "capacity"))


@functools.partial(jax.jit, static_argnames=("spec", "capacity"))
def generate_tokens(
  params, batch_tokens, batch_positions, batch_mask, rng, spec, capacity, lora=None
):
  """One compiled program: prefill + first sample + fused decode loop."""
  state = begin(params, batch_tokens, batch_positions, batch_mask, rng, spec, capacity, lora)
  return decode_loop(params, state, spec, lora)


def trim(tokens: np.ndarray, stop_ids: Sequence[int]) -> list[list[int]]:
  """Token rows -> lists cut before the first stop id (stop and padding dropped)."""
  out = []
  stops = set(stop_ids)
  for row in np.asarray(tokens).tolist():
    cut = next((i for i, t in enumerate(row) if t in stops), len(row))
    out.append(row[:cut])
  return out
