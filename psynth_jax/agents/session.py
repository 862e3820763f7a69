"""One agent's conversation on an explicit KV cache: every turn prefills only its new ids.

  session = CacheSession.text(lm, max_new_tokens=256, capacity=2048)   # a worker, the text baseline
  session = CacheSession.latent(lm, branches, mapper, lora, ...)        # the synthesizer
  out = session.turn(prompt_ids)        # prefill, then decode one output
  out = session.turn(observation_ids)   # only these ids are prefilled, over everything before

Layout (batch 1). Cache rows, in order: [merged branch rows (latent only)] [turn 1 input]
[output 1] [turn 2 input] [output 2] ... Each turn's input is left-padded to a length bucket
(`decode.bucket`, so few programs compile); padding rows are invalid and take no position,
so the real tokens sit at consecutive positions: 0, 1, ... in a text session, and
start + 0, 1, ... over a latent prefix, start = max_i span_i (`merge.synth_start_position`).

The prefix. A latent session's first turn is one program: re-encode + map + merge the
branches into the session's cache (rows [0, rows)), prefill the first input after them and
sample the first token, exactly the single-turn cache path up to its first token. Each later
turn prefills only its own new ids into the same cache buffer, which every program takes
donated (updated in place): the merged prefix is built once and never recomputed, and it is
not copied per turn.

Ends of outputs. Decoding stops at a stop id, which is not written: the next turn's ids start
with the chat template's own end of turn (`ChatFormat.observations`). An output cut by the
budget has its last token not yet written; it is written first in the next turn, or by
`flush`. `session.written` records every written token (id, row, position, turn, input or
output): the worker memory modes read it (`psynth_jax.agents.memory`).

TTFT. `Turn.first_token_s` runs from the call to the first new token on the host; the first
turn's is the synthesizer's TTFT (latent: merge + prefill of its prompt + first sample; text
baseline: prefill of the whole pasted prompt + first sample), from token ids on both.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import decode
from psynth_jax.kv_cache import KVCache
from psynth_jax.mapper import Mapper
from psynth_jax.merge import merge, synth_start_position
from psynth_jax.model.lora import check_lora
from psynth_jax.model.transformer import hidden_states
from psynth_jax.synthesis import branch_rows, check_adapters, check_branches, check_num_workers
from psynth_jax.workers import Branches


@functools.partial(jax.jit, static_argnames=("spec", "capacity"))
def _begin_text(params, tokens, positions, mask, rng, lora, spec, capacity):
  cache = KVCache.empty(params.config, tokens.shape[0], capacity)
  logits, cache = decode.prefill(params, tokens, positions, mask, cache, lora)
  return decode.start(logits, positions[:, -1] + 1, cache, rng, spec), logits[0]


@functools.partial(jax.jit, static_argnames=("spec", "rows", "capacity"))
def _begin_latent(
  params, branches, tokens, positions, mask, mapper, lora, num_workers, rng, spec, rows, capacity
):
  cache = merge(branches, params.config, mapper, rows, capacity, num_workers)
  positions = positions + synth_start_position(branches)
  logits, cache = decode.prefill(params, tokens, positions, mask, cache, lora)
  return decode.start(logits, positions[:, -1] + 1, cache, rng, spec), logits[0]


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def _continue(params, cache, tokens, positions, mask, rng, lora, spec):
  logits, cache = decode.prefill(params, tokens, positions, mask, cache, lora)
  return decode.start(logits, positions[:, -1] + 1, cache, rng, spec), logits[0]


@functools.partial(jax.jit, donate_argnames=("cache",))
def _write(params, cache, tokens, positions, mask, lora):
  return hidden_states(params, tokens, positions, cache, mask, lora)[1]


@dataclasses.dataclass(frozen=True)
class Written:
  """One token in the cache: its id, row and RoPE position, the turn that wrote it, and
  whether it is part of that turn's input or its output."""

  id: int
  row: int
  position: int
  turn: int
  output: bool


@dataclasses.dataclass
class Turn:
  fed: list[int]  # ids prefilled: a pending output token of the turn before, then the new ids
  output: list[int]  # ids generated (stop id excluded)
  stopped: bool  # ended on a stop id (else the budget ran out)
  first_token_s: float  # call -> first new token on the host
  seconds: float  # the whole turn
  first_logits: jax.Array  # [V] float32, what the first new token was sampled from


@dataclasses.dataclass(frozen=True)
class LatentPrefix:
  branches: Branches
  mapper: Mapper | None
  rows: int  # static rows of the merged branches
  num_workers: jax.Array | None  # K as the mapper sees it
  start: int  # max_i span_i: the position of the session's first token


class CacheSession:
  """A batch-1 conversation on its own cache (see the module docstring).

  Use `CacheSession.text` (a fresh cache) or `CacheSession.latent` (over merged branches).

  Args:
    lm: the `LanguageModel`.
    max_new_tokens: the decode budget of every turn.
    capacity: cache rows for the session's own tokens (padding included; the merged branch
      rows come on top), fixed for the session so that its programs compile once.
    lora: an adapter for every turn (the synthesizer's), or None.
    sampling, seed: how tokens are drawn (turn j uses `fold_in(key(seed), j)`).
    prefix: the merged branches a latent session reads.
  """

  def __init__(
    self,
    lm,
    max_new_tokens: int,
    capacity: int,
    *,
    lora=None,
    sampling: decode.Sampling = decode.GREEDY,
    seed: int = 0,
    prefix: LatentPrefix | None = None,
  ):
    if not isinstance(sampling, decode.Sampling):
      raise TypeError(f"sampling must be a decode.Sampling, got {type(sampling).__name__}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_lora(lora, lm.config)
    self.lm, self.lora, self.prefix = lm, lora, prefix
    self.spec = decode.DecodeSpec(max_new_tokens, sampling, tuple(lm.stop_ids), lm.pad_id)
    self.prefix_rows = 0 if prefix is None else prefix.rows
    self.capacity = self.prefix_rows + capacity
    self.index = self.prefix_rows  # the next row to write
    self.position = 0 if prefix is None else prefix.start  # the next token's position
    self.turns: list[Turn] = []
    self.written: list[Written] = []
    self._pending: list[int] = []  # output ids not written yet (the last one, after a cut)
    self._cache: KVCache | None = None
    self._key = jax.random.key(seed)

  @classmethod
  def text(cls, lm, max_new_tokens: int = 256, capacity: int = 2048, **kwargs) -> CacheSession:
    """A session on a fresh cache: positions from 0 (a worker agent, the text baseline)."""
    return cls(lm, max_new_tokens, capacity, **kwargs)

  @classmethod
  def latent(
    cls,
    lm,
    branches: Branches,
    mapper: Mapper | None = None,
    lora=None,
    max_new_tokens: int = 256,
    capacity: int = 2048,
    *,
    rows: int | None = None,
    num_workers: int | None = None,
    allow_foreign_branches: bool = False,
    **kwargs,
  ) -> CacheSession:
    """The synthesizer over K branches, merged once by its first turn (see `synthesize`
    for `mapper`, `lora`, `rows`, `num_workers` and `allow_foreign_branches`)."""
    check_branches(lm, branches, allow_foreign_branches)
    check_adapters(lm, mapper, lora)
    check_num_workers(branches, num_workers)
    used = int(np.asarray(branches.lengths).sum())
    rows = branch_rows(branches) if rows is None else rows
    if rows < used:
      raise ValueError(f"rows={rows} cannot hold the {used} branch tokens")
    nw = None if num_workers is None else jnp.asarray(num_workers, jnp.int32)
    start = int(np.asarray(branches.span).max())
    prefix = LatentPrefix(branches, mapper, rows, nw, start)
    return cls(lm, max_new_tokens, capacity, lora=lora, prefix=prefix, **kwargs)

  @property
  def cache(self) -> KVCache | None:
    """The cache as it stands (None before the first turn). A later turn donates it."""
    return self._cache

  @property
  def prefilled(self) -> int:
    """Tokens this session has prefilled, over all turns (merged branch rows are not)."""
    return sum(len(t.fed) for t in self.turns)

  def _batch(self, ids: Sequence[int], new_tokens: int):
    """Checks `ids` (and room for `new_tokens` after them) and left-pads them to a bucket:
    (tokens, positions from 0, mask, width)."""
    if not ids:
      raise ValueError("a turn needs at least one new token id")
    self.lm.check_ids(np.asarray([ids]), self.lora)
    width = decode.bucket(len(ids))
    budget = width + new_tokens
    if self.index + budget > self.capacity:
      raise ValueError(
        f"the session's cache is full: {self.index - self.prefix_rows} of"
        f" {self.capacity - self.prefix_rows} rows used, this turn needs up to {budget} more"
      )
    limit = self.lm.config.max_position_embeddings
    if self.position + len(ids) + new_tokens > limit:
      raise ValueError(
        f"position {self.position} + {len(ids)} new tokens + max_new_tokens {new_tokens}"
        f" exceed the model's max_position_embeddings ({limit})"
      )
    batch = decode.pad_prompts([list(ids)], width, self.lm.pad_id)
    return batch.tokens, batch.positions, batch.mask, width

  def _record(self, ids, width: int, pending: int) -> None:
    """Notes ids written at the end of a `width`-row input block. The first `pending` ones
    are the last recorded turn's output; the rest the input of the turn under way."""
    pad, last = width - len(ids), len(self.turns) - 1
    for j, token in enumerate(ids):
      out = j < pending
      row, position = self.index + pad + j, self.position + j
      self.written.append(Written(int(token), row, position, last if out else last + 1, out))
    self.index += width
    self.position += len(ids)

  def turn(self, new_ids: Sequence[int]) -> list[int]:
    """Prefills `new_ids` after everything so far, decodes one output and returns its ids."""
    start = time.perf_counter()
    pending = len(self._pending)
    ids = self._pending + [int(i) for i in new_ids]
    tokens, positions, mask, width = self._batch(ids, self.spec.max_new_tokens)
    rng = jax.random.fold_in(self._key, len(self.turns))
    params, spec = self.lm.params, self.spec
    t0 = time.perf_counter()  # from token ids, as `synthesize` times its first token
    if self._cache is None and self.prefix is not None:
      p = self.prefix
      state, logits = _begin_latent(
        params,
        p.branches,
        tokens,
        positions,
        mask,
        p.mapper,
        self.lora,
        p.num_workers,
        rng,
        spec,
        p.rows,
        self.capacity,
      )
    elif self._cache is None:
      state, logits = _begin_text(
        params, tokens, positions + self.position, mask, rng, self.lora, spec, self.capacity
      )
    else:
      cache, self._cache = self._cache, None  # donated
      state, logits = _continue(
        params, cache, tokens, positions + self.position, mask, rng, self.lora, spec
      )
    jax.device_get(state.tokens[0, 0])  # the first new token is on the host
    first_token_s = time.perf_counter() - t0
    state = decode.jit_decode_loop(params, state, spec, self.lora)
    steps = int(state.step)
    recorded = np.asarray(jax.device_get(state.tokens))
    output = decode.trim(recorded, spec.stop_ids)[0]
    written = steps - 1  # the last recorded token is never fed
    self._record(ids, width, pending)
    for j in range(written):
      self.written.append(
        Written(output[j], self.index + j, self.position + j, len(self.turns), True)
      )
    self.index += written
    self.position += written
    if int(state.cache.index) != self.index:  # the host's rows must match the cache's
      raise AssertionError(f"cache index {int(state.cache.index)} != host index {self.index}")
    self._cache = state.cache
    self._pending = output[written:]
    stopped = len(output) < steps
    self.turns.append(
      Turn(ids, output, stopped, first_token_s, time.perf_counter() - start, logits)
    )
    return output

  def flush(self) -> None:
    """Writes the pending output token, if any, so every output token has its cache row."""
    if not self._pending:
      return
    if self._cache is None:
      raise AssertionError("pending tokens without a cache")
    tokens, positions, mask, width = self._batch(self._pending, 0)
    cache, self._cache = self._cache, None
    self._cache = _write(self.lm.params, cache, tokens, positions + self.position, mask, self.lora)
    pending, self._pending = self._pending, []
    self._record(pending, width, len(pending))
