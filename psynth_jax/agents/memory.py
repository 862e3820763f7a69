"""Worker memory: which cache rows of a worker agent's conversation become its branch.

A worker agent (`CacheSession` + `run_react`) wrote its whole conversation into its own
cache: prompt 1, output 1, the tool responses and prompt 2, output 2, ... Its branch for the
synthesizer is a choice of those rows, kept with their true positions (`MEMORY_MODES`):

* "final": the final turn's output only (the reference's standard setting). One
  contiguous output: offset = its first position, so it sits at 0 .. len - 1, span = len,
  as a single-turn worker's output does (its prompt being everything before it).
* "turns": every turn's output. Every kept row is shifted by the *first* turn's prompt
  length (offset = |prompt 1|): output 1 starts at 0, and later outputs keep the gaps their
  prompts and tool responses left. span = the last kept position + 1 - offset.
* "full": the whole conversation, prompts and tool responses included: offset = its first
  position (0), span = the number of tokens written.

`memory_branches` gathers the kept rows of K sessions into `Branches` whose cache stores
each row's original position and whose `spans` are set: the merge rotates every row of
branch i by -offset_i (exact: RoPE rotations compose), writes each row at its stored
position - offset_i, feeds the span to the mapper's length feature, and starts the
synthesizer at max_i span_i. `memory_ids` are the kept ids (what the text baseline pastes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from psynth_jax import decode
from psynth_jax.agents.session import CacheSession, SessionRow, Written
from psynth_jax.kv_cache import KVCache
from psynth_jax.workers import Branches

MEMORY_MODES = ("final", "turns", "full")
Conversation = CacheSession | SessionRow  # a batch-1 session, or one row of a batch


def kept_tokens(session: Conversation, mode: str) -> tuple[list[Written], int]:
  """The written tokens `mode` keeps, in cache order, and the branch's offset.

  Writes the session's pending output token first (`flush`), so every output token is kept.
  """
  if mode not in MEMORY_MODES:
    raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {mode!r}")
  if not session.turns:
    raise ValueError("the session has no turns yet")
  session.flush()
  written = session.written
  if mode == "full":
    return list(written), written[0].position
  if mode == "turns":
    first_input = [w for w in written if w.turn == 0 and not w.output]
    return [w for w in written if w.output], first_input[-1].position + 1
  last = len(session.turns) - 1
  kept = [w for w in written if w.output and w.turn == last]
  if kept:
    return kept, kept[0].position
  return kept, max(w.position for w in written) + 1  # an empty output: an empty branch


def memory_ids(session: Conversation, mode: str) -> list[int]:
  """The token ids `mode` keeps (the text baseline pastes their text)."""
  return [w.id for w in kept_tokens(session, mode)[0]]


def memory_branches(
  sessions: Sequence[Conversation], mode: str, capacity: int | None = None
) -> Branches:
  """K worker conversations -> their `Branches` under memory `mode` (module docstring).

  Args:
    sessions: the workers' finished conversations (batch-1 sessions or rows of batched
      ones; one model).
    mode: one of `MEMORY_MODES`.
    capacity: rows per branch; default: the length bucket of the longest kept branch.
  """
  if not sessions:
    raise ValueError("memory_branches needs at least one session")
  fingerprints = {s.lm.params.fingerprint for s in sessions}
  if len(fingerprints) != 1:
    raise ValueError(f"the sessions come from different models: {sorted(fingerprints)}")
  kept = [kept_tokens(s, mode) for s in sessions]
  longest = max(len(k) for k, _ in kept)
  capacity = capacity or decode.bucket(max(longest, 1))
  if longest > capacity:
    raise ValueError(f"a branch keeps {longest} rows, more than the capacity {capacity}")
  pad_id = sessions[0].lm.pad_id
  k_rows, v_rows, positions, tokens, lengths, offsets, spans = [], [], [], [], [], [], []
  for session, (tokens_kept, offset) in zip(sessions, kept, strict=True):
    n = len(tokens_kept)
    rows = np.zeros(capacity, np.int32)
    rows[:n] = [w.row for w in tokens_kept]
    k, v, pos = session.take_rows(jnp.asarray(rows))
    k_rows.append(k)
    v_rows.append(v)
    positions.append(jnp.where(jnp.arange(capacity) < n, pos, 0))
    ids = np.full(capacity, pad_id, np.int32)
    ids[:n] = [w.id for w in tokens_kept]
    tokens.append(ids)
    lengths.append(n)
    offsets.append(offset)
    spans.append(tokens_kept[-1].position - offset + 1 if n else 0)
  lengths = jnp.asarray(lengths, jnp.int32)
  cache = KVCache(
    k=tuple(jnp.stack(layer) for layer in zip(*k_rows, strict=True)),
    v=tuple(jnp.stack(layer) for layer in zip(*v_rows, strict=True)),
    positions=jnp.stack(positions).astype(jnp.int32),
    valid=jnp.arange(capacity)[None, :] < lengths[:, None],
    index=jnp.asarray(capacity, jnp.int32),
  )
  return Branches(
    cache,
    lengths,
    jnp.asarray(offsets, jnp.int32),
    jnp.asarray(np.stack(tokens)),
    fingerprints.pop(),
    spans=jnp.asarray(spans, jnp.int32),
  )
