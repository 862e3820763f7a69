"""Agents' conversations on an explicit KV cache: every turn prefills only its new ids.

  session = CacheSession.text(lm, max_new_tokens=256, capacity=2048)   # a worker, the text baseline
  session = CacheSession.latent(lm, branches, mapper, lora, ...)        # the synthesizer
  out = session.turn(prompt_ids)        # prefill, then decode one output
  out = session.turn(observation_ids)   # only these ids are prefilled, over everything before

  agents = CacheSession.text(lm, 256, 4096, batch=12)   # 12 conversations in one cache
  outs = agents.step([ids_0, None, ids_2, ...])          # the rows given ids take a turn
  agents.row(2).turns, agents.row(2).written             # one conversation's record

Layout. Cache rows, in order: [merged branch rows (latent only)] [turn 1 input]
[output 1] [turn 2 input] [output 2] ... Each turn's input is left-padded to a length bucket
(`decode.bucket`, so few programs compile); padding rows are invalid and take no position,
so the real tokens sit at consecutive positions: 0, 1, ... in a text session, and
start + 0, 1, ... over a latent prefix, start = max_i span_i (`merge.synth_start_position`).

Batches. A text session may hold `batch` conversations (agents of several episodes), one
cache row each; `step` gives each conversation its own new ids, or None to sit the turn
out. All of them share the row index: a turn's input block is as wide as the longest input,
its output block as long as the longest output. Rows a conversation does not use in a block
(left padding, the slots after its stop id, a whole turn it sat out) are marked invalid
after the turn, so each conversation's cache holds exactly its own tokens at its own
positions, as a batch-1 session's does: greedy outputs equal batch-1 outputs (tested).
With sampling, row b's draws depend on the batch (one key per step for all rows).

The prefix. A latent session's first turn is one program: re-encode + map + merge the
branches into the session's cache (rows [0, rows)), prefill the first input after them and
sample the first token, exactly the single-turn cache path up to its first token. Each later
turn prefills only its own new ids into the same cache buffer, which every program takes
donated (updated in place): the merged prefix is built once and never recomputed, and it is
not copied per turn. A latent session has batch 1.

Ends of outputs. Decoding stops at a stop id, which is not written: the next turn's ids start
with the chat template's own end of turn (`ChatFormat.observations`). An output cut by the
budget has its last token not yet written; it is written first in the next turn, or by
`flush`. `written` records every written token (id, row, position, turn, input or output):
the worker memory modes read it (`psynth_jax.agents.memory`).

TTFT. `Turn.first_token_s` runs from the call to the first new token on the host; the first
turn's is the synthesizer's TTFT (latent: merge + prefill of its prompt + first sample; text
baseline: prefill of the whole pasted prompt + first sample), from token ids on both.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import decode
from psynth_jax.agents import session_programs as programs
from psynth_jax.kv_cache import KVCache
from psynth_jax.mapper import Mapper
from psynth_jax.model.lora import check_lora
from psynth_jax.synthesis import branch_rows, check_adapters, check_branches, check_num_workers
from psynth_jax.workers import Branches


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
  seconds: float  # the whole turn (the batch's, in a batch)
  first_logits: jax.Array | None  # [V] float32, what the first new token was sampled from
  # (None for a `replay`ed turn: nothing was sampled)


@dataclasses.dataclass(frozen=True)
class LatentPrefix:
  branches: Branches
  mapper: Mapper | None
  rows: int  # static rows of the merged branches
  num_workers: jax.Array | None  # K as the mapper sees it
  start: int  # max_i span_i: the position of the session's first token


@dataclasses.dataclass
class _Conversation:
  position: int  # the next token's position
  turns: list[Turn] = dataclasses.field(default_factory=list)
  written: list[Written] = dataclasses.field(default_factory=list)
  pending: list[int] = dataclasses.field(default_factory=list)  # output ids not written yet


class SessionRow:
  """One conversation of a session: what `run_react` drives (`turn`) and memory reads."""

  def __init__(self, session: CacheSession, b: int):
    self.session, self.b = session, b
    self._c = session._rows[b]

  @property
  def lm(self):
    return self.session.lm

  @property
  def turns(self) -> list[Turn]:
    return self._c.turns

  @property
  def written(self) -> list[Written]:
    return self._c.written

  @property
  def prefilled(self) -> int:
    """Tokens this conversation prefilled, over all turns (merged branch rows are not)."""
    return sum(len(t.fed) for t in self._c.turns)

  def turn(self, new_ids: Sequence[int], banned: Sequence[int] = ()) -> list[int]:
    """This conversation alone takes a turn (the others sit it out), never sampling `banned`."""
    feeds = [None] * self.session.batch
    feeds[self.b] = new_ids
    bans = None
    if banned:
      bans = [()] * self.session.batch
      bans[self.b] = banned
    return self.session.step(feeds, bans)[self.b]

  def flush(self) -> None:
    self.session.flush()

  def take_rows(self, rows: jax.Array):
    """Cache rows of this conversation: (k, v: L x [G, S, H], positions [S])."""
    return programs.take_rows(self.session.cache, jnp.asarray(self.b, jnp.int32), rows)


class CacheSession:
  """Conversations on one cache (see the module docstring).

  Use `CacheSession.text` (a fresh cache) or `CacheSession.latent` (over merged branches).
  With batch 1 the session is its one conversation: `turn`, `turns`, `written`,
  `prefilled`, `take_rows` are `row(0)`'s.

  Args:
    lm: the `LanguageModel`.
    max_new_tokens: the decode budget of every turn.
    capacity: cache rows for the session's own tokens (padding included; the merged branch
      rows come on top), fixed for the session so that its programs compile once.
    batch: conversations in the session (text sessions only).
    lora: an adapter for every turn (the synthesizer's), or None.
    sampling, seed: how tokens are drawn (the j-th step uses `fold_in(key(seed), j)`).
    prefix: the merged branches a latent session reads.
  """

  def __init__(
    self,
    lm,
    max_new_tokens: int,
    capacity: int,
    *,
    batch: int = 1,
    lora=None,
    sampling: decode.Sampling = decode.GREEDY,
    seed: int = 0,
    prefix: LatentPrefix | None = None,
  ):
    if not isinstance(sampling, decode.Sampling):
      raise TypeError(f"sampling must be a decode.Sampling, got {type(sampling).__name__}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch < 1 or (prefix is not None and batch != 1):
      raise ValueError(f"batch must be >= 1 (1 for a latent session), got {batch}")
    check_lora(lora, lm.config)
    self.lm, self.lora, self.prefix, self.batch = lm, lora, prefix, batch
    self.spec = decode.DecodeSpec(max_new_tokens, sampling, tuple(lm.stop_ids), lm.pad_id)
    self.prefix_rows = 0 if prefix is None else prefix.rows
    self.capacity = self.prefix_rows + capacity
    self.index = self.prefix_rows  # the next row to write
    start = 0 if prefix is None else prefix.start
    self._rows = [_Conversation(start) for _ in range(batch)]
    self._steps = 0
    self._cache: KVCache | None = None
    self._key = jax.random.key(seed)

  @classmethod
  def text(cls, lm, max_new_tokens: int = 256, capacity: int = 2048, **kwargs) -> CacheSession:
    """A session on a fresh cache: positions from 0 (worker agents, the text baseline)."""
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
    if mapper is not None and not isinstance(mapper, Mapper):
      raise NotImplementedError(
        f"an agent session merges with the paper's operator and a mapper; {type(mapper).__name__}"
        " (a merge operator) is not supported here"
      )
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

  def row(self, b: int) -> SessionRow:
    if not 0 <= b < self.batch:
      raise IndexError(f"conversation {b} of a batch of {self.batch}")
    return SessionRow(self, b)

  def _only(self) -> SessionRow:
    if self.batch != 1:
      raise ValueError(f"the session holds {self.batch} conversations: use row(b)")
    return self.row(0)

  @property
  def turns(self) -> list[Turn]:
    return self._only().turns

  @property
  def written(self) -> list[Written]:
    return self._only().written

  @property
  def prefilled(self) -> int:
    return self._only().prefilled

  def take_rows(self, rows: jax.Array):
    return self._only().take_rows(rows)

  def turn(self, new_ids: Sequence[int], banned: Sequence[int] = ()) -> list[int]:
    """Prefills `new_ids` after everything so far, decodes one output (never sampling the
    `banned` ids) and returns its ids."""
    return self._only().turn(new_ids, banned)

  def _block(self, ids: Sequence[Sequence[int]], new_tokens: int):
    """Checks each conversation's ids (and room for `new_tokens` after them) and left-pads
    them to one bucket: (tokens, positions, mask, width). Empty ids: a row sitting out."""
    lengths = [len(x) for x in ids]
    used = [x for x in ids if x]
    width = decode.bucket(max(lengths))
    for x in used:
      self.lm.check_ids(np.asarray([x]), self.lora)
    budget = width + new_tokens
    if self.index + budget > self.capacity:
      raise ValueError(
        f"the session's cache is full: {self.index - self.prefix_rows} of"
        f" {self.capacity - self.prefix_rows} rows used, this turn needs up to {budget} more"
      )
    limit = self.lm.config.max_position_embeddings
    for c, n in zip(self._rows, lengths, strict=True):
      if n and c.position + n + new_tokens > limit:
        raise ValueError(
          f"position {c.position} + {n} new tokens + max_new_tokens {new_tokens}"
          f" exceed the model's max_position_embeddings ({limit})"
        )
    tokens = np.full((self.batch, width), self.lm.pad_id, np.int32)
    mask = np.zeros((self.batch, width), bool)
    for b, x in enumerate(ids):
      if x:
        tokens[b, width - len(x) :] = x
        mask[b, width - len(x) :] = True
    start = np.array([c.position for c in self._rows], np.int32)[:, None]
    positions = start + np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, mask, width

  def _record(self, c: _Conversation, ids, width: int, pending: int) -> None:
    """Notes ids written at the end of the `width`-row input block at `self.index`. The
    first `pending` are the last recorded turn's output; the rest the next turn's input."""
    pad, last = width - len(ids), len(c.turns) - 1
    for j, token in enumerate(ids):
      out = j < pending
      row, position = self.index + pad + j, c.position + j
      c.written.append(Written(int(token), row, position, last if out else last + 1, out))
    c.position += len(ids)

  def step(
    self, feeds: Sequence[Sequence[int] | None], banned: Sequence[Sequence[int]] | None = None
  ) -> list[list[int] | None]:
    """One turn of every conversation given ids (None: it sits out); their outputs' ids.

    `banned[b]`: token ids conversation b does not sample in this turn (None: none)."""
    start = time.perf_counter()
    if len(feeds) != self.batch:
      raise ValueError(f"{len(feeds)} feeds for a batch of {self.batch}")
    if all(f is None for f in feeds):
      raise ValueError("no conversation was given new ids")
    if self._cache is None and any(f is None for f in feeds):
      raise ValueError("every conversation takes the first turn")
    if any(f is not None and len(f) == 0 for f in feeds):
      raise ValueError("a turn needs at least one new token id")
    ids = [
      [] if f is None else c.pending + [int(i) for i in f]
      for c, f in zip(self._rows, feeds, strict=True)
    ]
    tokens, positions, mask, width = self._block(ids, self.spec.max_new_tokens)
    rng = jax.random.fold_in(self._key, self._steps)
    params, spec = self.lm.params, self.spec
    ban = programs.banned_ids(banned, self.batch, self.lm.config.vocab_size)
    t0 = time.perf_counter()  # from token ids, as `synthesize` times its first token
    if self._cache is None and self.prefix is not None:
      p = self.prefix
      state, logits = programs.begin_latent(
        params,
        p.branches,
        tokens,
        positions - p.start,  # `_begin_latent` adds the start itself
        mask,
        p.mapper,
        self.lora,
        p.num_workers,
        rng,
        spec,
        p.rows,
        self.capacity,
        ban,
      )
    elif self._cache is None:
      state, logits = programs.begin_text(
        params, tokens, positions, mask, rng, self.lora, spec, self.capacity, ban
      )
    else:
      cache, self._cache = self._cache, None  # donated
      state, logits = programs.continue_(
        params, cache, tokens, positions, mask, rng, self.lora, spec, ban
      )
    jax.device_get(state.tokens[:, 0])  # the first new tokens are on the host
    first_token_s = time.perf_counter() - t0
    state = decode.jit_decode_loop(params, state, spec, self.lora)
    self._steps += 1
    steps = int(state.step)
    outputs = decode.trim(np.asarray(jax.device_get(state.tokens)), spec.stop_ids)
    fed = steps - 1  # the last recorded token is never fed
    block = self.index + width  # the output block's first row
    first_unused = np.full(self.batch, block + fed, np.int32)
    results: list[list[int] | None] = []
    for b, (c, f) in enumerate(zip(self._rows, feeds, strict=True)):
      if f is None:
        first_unused[b] = self.index  # the whole turn: padding, then another row's outputs
        results.append(None)
        continue
      self._record(c, ids[b], width, len(c.pending))
      output = outputs[b]
      written = min(len(output), fed)  # a stopped row fed its stop id and padding after it
      for j in range(written):
        c.written.append(Written(output[j], block + j, c.position + j, len(c.turns), True))
      c.position += written
      c.pending = output[written:]
      first_unused[b] = block + written
      seconds = time.perf_counter() - start
      c.turns.append(Turn(ids[b], output, len(output) < steps, first_token_s, seconds, logits[b]))
      results.append(output)
    self.index = block + fed
    if int(state.cache.index) != self.index:  # the host's rows must match the cache's
      raise AssertionError(f"cache index {int(state.cache.index)} != host index {self.index}")
    cache = state.cache
    if (first_unused < self.index).any():
      cache = programs.invalidate(
        cache, jnp.asarray(first_unused), jnp.asarray(self.index, jnp.int32)
      )
    self._cache = cache
    return results

  def flush(self) -> None:
    """Writes the pending output tokens, if any, so every output token has its cache row."""
    ids = [c.pending for c in self._rows]
    if not any(ids):
      return
    if self._cache is None:
      raise AssertionError("pending tokens without a cache")
    tokens, positions, mask, width = self._block(ids, 0)
    cache, self._cache = self._cache, None
    self._cache = programs.write(self.lm.params, cache, tokens, positions, mask, self.lora)
    for c in self._rows:
      if c.pending:
        pending, c.pending = c.pending, []
        self._record(c, pending, width, len(pending))
    self.index += width

  def replay(self, new_ids: Sequence[int], output: Sequence[int]) -> None:
    """Writes a recorded turn of a batch-1 text session instead of decoding it: `new_ids`
    its input (`written`'s input ids of that turn), `output` its output. `written` (ids,
    positions, turns, flags), hence every memory mode, comes out as the live run's; the
    cache rows within float rounding (one prefill, not a decode)."""
    c = self._only()._c
    if self.prefix is not None or c.pending:
      raise ValueError("replay rebuilds a text session from its turns' records only")
    if not new_ids:
      raise ValueError("a turn needs at least one new token id")
    ids = [int(i) for i in (*new_ids, *output)]
    tokens, positions, mask, width = self._block([ids], 0)
    cache = self._cache or KVCache.empty(self.lm.config, 1, self.capacity)
    self._cache = None
    self._cache = programs.write(self.lm.params, cache, tokens, positions, mask, self.lora)
    first, turn = self.index + width - len(ids), len(c.turns)
    for j, token in enumerate(ids):
      c.written.append(Written(token, first + j, c.position + j, turn, j >= len(new_ids)))
    c.position += len(ids)
    self.index += width
    c.turns.append(Turn(list(new_ids), list(output), True, 0.0, 0.0, None))
