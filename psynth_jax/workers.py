"""Worker branches: K prompts decoded together, keeping the cache rows of their outputs.

`Branches` is what the synthesizer reads. Its `cache` is a `KVCache` whose
batch axis is the branch axis K; branch i's rows [0, lengths[i]) hold the keys
(already RoPE-rotated at positions offsets[i] + t) and values of its output
tokens; later rows are padding. Two ways to get one:

* `run_workers`: the frozen base model decodes K prompts in one compiled
  program (batched over branches, each stopping on its own); rows of the
  *output* tokens are kept, prompt rows dropped (the paper's default), and
  offsets[i] is the position of the first output token.
* `encode_branches`: given texts are prefilled independently from position 0
  (offsets 0); this is how training builds branch caches.

An empty branch (length 0) is allowed: it contributes no rows.

Multi-turn branches (`psynth_jax.agents.memory`) keep rows that are not at
consecutive positions: a worker agent's kept turn outputs, with its prompts and
tool responses between them dropped. They set `spans`, and then the merge reads
each row's stored position (`cache.positions`, minus `offsets[i]`) instead of
its row index, and a branch's span (its last position + 1 after the shift) is
both the mapper's length feature and what the synthesizer's start
(max_i span_i) is taken over. Single-turn branches leave `spans` None: rows at
positions offsets[i] + r, span = length, merged exactly as before.

`Branches.fingerprint` is the `Params.fingerprint` of the model that made the
cache (static, like the params'); synthesis refuses branches from another
model unless told otherwise (`allow_foreign_branches=True`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import decode, pytree
from psynth_jax.kv_cache import KVCache, take_rows
from psynth_jax.model.transformer import Params, hidden_states


@pytree.dataclass
class Branches:
  cache: KVCache  # batch axis = K branches
  lengths: jax.Array  # [K] int32, output tokens kept per branch
  offsets: jax.Array  # [K] int32, RoPE position of row 0 of each branch
  tokens: jax.Array  # [K, S] int32, the branch tokens (pad beyond lengths)
  fingerprint: str = pytree.field(static=True, default="")  # of the model that made them
  # [K] int32, multi-turn branches only: last kept position - offsets[i] + 1 (read as 0
  # where a branch is empty). None: rows at consecutive positions offsets[i] + r (span = length).
  spans: jax.Array | None = None

  @property
  def num_branches(self) -> int:
    return self.lengths.shape[0]

  @property
  def span(self) -> jax.Array:
    """[K] positions each branch covers after re-encoding: `spans` (0 for an emptied
    branch), or `lengths` if None."""
    if self.spans is None:
      return self.lengths
    return jnp.where(self.lengths > 0, self.spans, 0).astype(jnp.int32)

  def with_spans(self) -> Branches:
    """The same branches with `spans` set (to the lengths where it was None).

    Lets single-turn and multi-turn branches stack into one batch. Merging then reads the
    stored positions, which for the rows `run_workers`, `encode_branches` and
    `worker_branches` make are offsets[i] + r: the same merged cache.
    """
    return self if self.spans is not None else self.replace(spans=self.lengths)

  @property
  def capacity(self) -> int:
    return self.cache.capacity

  def take(self, order: Sequence[int]) -> Branches:
    """The same branches in another order."""
    idx = jnp.asarray(order)
    return jax.tree.map(lambda x: x[idx] if x.ndim else x, self)


@dataclasses.dataclass
class WorkerOutputs:
  tokens: list[list[int]]  # output ids per branch (stop id excluded)
  texts: list[str] | None
  branches: Branches
  seconds: float  # wall time of the worker program


def _finish(params, state, first_positions, prompt_rows, spec):
  state = decode.decode_loop(params, state, spec)
  # The last recorded token has not been fed yet; feed it so every output
  # token has its cache row.
  _, cache = hidden_states(params, state.last[:, None], state.position[:, None], state.cache)
  branches = _output_branches(cache, state.tokens, first_positions, prompt_rows, spec)
  return state.tokens, branches.replace(fingerprint=params.fingerprint)


@functools.partial(jax.jit, static_argnames=("spec", "capacity"))
def _worker_program(params, tokens, positions, mask, rng, spec, capacity):
  state = decode.begin(params, tokens, positions, mask, rng, spec, capacity)
  return _finish(params, state, positions[:, -1] + 1, tokens.shape[1], spec)


@functools.partial(jax.jit, static_argnames=("spec", "capacity"))
def _shared_prefix_program(
  params, prefix, prefix_mask, tokens, positions, mask, rng, spec, capacity
):
  """Prefills the common prefix once (batch 1), then the K suffixes on copies of its cache."""
  k, p = tokens.shape[0], prefix.shape[1]
  prefix_positions = jnp.maximum(jnp.cumsum(prefix_mask, axis=1) - 1, 0)
  cache = KVCache.empty(params.config, 1, capacity)
  _, cache = hidden_states(params, prefix, prefix_positions, cache, prefix_mask)
  cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape[1:])) if x.ndim else x, cache)
  positions = positions + prefix_mask.sum()
  logits, cache = decode.prefill(params, tokens, positions, mask, cache)
  state = decode.start(logits, positions[:, -1] + 1, cache, rng, spec)
  return _finish(params, state, positions[:, -1] + 1, p + tokens.shape[1], spec)


def _output_branches(
  cache: KVCache, out_tokens, first_positions, prompt_rows: int, spec
) -> Branches:
  """Cuts the output rows [prompt_rows, prompt_rows + max_new) out of a worker cache."""
  n = spec.max_new_tokens
  is_stop = jnp.isin(out_tokens, jnp.asarray(spec.stop_ids or (-1,), jnp.int32))
  lengths = jnp.where(is_stop.any(-1), jnp.argmax(is_stop, -1), n).astype(jnp.int32)
  valid = jnp.arange(n)[None, :] < lengths[:, None]
  rows = slice(prompt_rows, prompt_rows + n)
  out = KVCache(
    k=tuple(k[:, :, rows] for k in cache.k),
    v=tuple(v[:, :, rows] for v in cache.v),
    positions=cache.positions[:, rows],
    valid=valid,
    index=jnp.asarray(n, jnp.int32),
  )
  tokens = jnp.where(valid, out_tokens, spec.pad_id)
  return Branches(out, lengths, first_positions.astype(jnp.int32), tokens)


def run_workers(
  lm,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  sampling: decode.Sampling = decode.GREEDY,
  seed: int = 0,
  shared_prefix: Sequence[int] | None = None,
) -> WorkerOutputs:
  """Decodes K worker prompts (token lists) together with the frozen base model.

  Args:
    lm: the `LanguageModel` (frozen base weights, no adapter).
    prompts: K prompts (token ids); with `shared_prefix`, the per-worker suffixes.
    max_new_tokens: output budget per worker (its cache rows are kept).
    shared_prefix: tokens common to every worker prompt (e.g. system prompt +
      task). They are prefilled once instead of K times; worker i then sees
      [shared_prefix + prompts[i]], so outputs match the unshared run.

  Returns:
    Output ids/texts per branch and their `Branches` (output rows only).
  """
  if len(prompts) == 0:
    raise ValueError("run_workers needs at least one prompt")
  prefix = list(shared_prefix or [])
  full = [prefix + list(p) for p in prompts]
  lm.prepare(full, max_new_tokens, sampling)  # validates the full prompts
  spec, batch, _ = lm.prepare(prompts, max_new_tokens, sampling)
  key = jax.random.key(seed)
  args = (
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.positions),
    jnp.asarray(batch.mask),
    key,
    spec,
  )
  t0 = time.perf_counter()
  if prefix:
    pre = decode.pad_prompts([prefix], decode.bucket(len(prefix)), lm.pad_id)
    capacity = pre.tokens.shape[1] + batch.tokens.shape[1] + max_new_tokens
    out_tokens, branches = _shared_prefix_program(
      lm.params, jnp.asarray(pre.tokens), jnp.asarray(pre.mask), *args, capacity
    )
  else:
    capacity = batch.tokens.shape[1] + max_new_tokens
    out_tokens, branches = _worker_program(lm.params, *args, capacity)
  token_lists = decode.trim(jax.device_get(out_tokens), spec.stop_ids)
  seconds = time.perf_counter() - t0
  texts = [lm.decode_text(t) for t in token_lists] if lm.tokenizer is not None else None
  return WorkerOutputs(token_lists, texts, branches, seconds)


@jax.jit
def _encode_program(params: Params, tokens, mask):
  k, s = tokens.shape
  cache = KVCache.empty(params.config, k, s)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (k, s))
  _, cache = hidden_states(params, tokens, positions, cache, mask)
  lengths = mask.sum(-1).astype(jnp.int32)
  return Branches(cache, lengths, jnp.zeros((k,), jnp.int32), tokens, params.fingerprint)


def encode_branches(
  lm, token_lists: Sequence[Sequence[int]], capacity: int | None = None
) -> Branches:
  """Prefills each token list independently from position 0 (right-padded to a bucket).

  Args:
    lm: the `LanguageModel` (frozen base, no adapter).
    token_lists: K branch token lists (an empty list gives an empty branch).
    capacity: rows per branch; default: the length bucket of the longest branch.
  """
  if len(token_lists) == 0:
    raise ValueError("encode_branches needs at least one branch")
  longest = max(len(t) for t in token_lists)
  capacity = capacity or decode.bucket(longest)
  if longest > capacity:
    raise ValueError(f"a branch has {longest} tokens, more than the capacity {capacity}")
  if longest > lm.config.max_position_embeddings:
    raise ValueError(f"a branch has {longest} tokens, beyond max_position_embeddings")
  tokens, mask = _right_padded(lm, token_lists, capacity)
  return _encode_program(lm.params, jnp.asarray(tokens), jnp.asarray(mask))


def _right_padded(lm, token_lists, width: int) -> tuple[np.ndarray, np.ndarray]:
  """[K, width] ids (checked against the vocabulary) and their mask, padded on the right."""
  tokens = np.full((len(token_lists), width), lm.pad_id, np.int32)
  mask = np.zeros(tokens.shape, bool)
  for i, t in enumerate(token_lists):
    tokens[i, : len(t)] = t
    mask[i, : len(t)] = True
  lm.check_ids(tokens)
  return tokens, mask


@functools.partial(jax.jit, static_argnames=("rows",))
def _rebuild_program(params: Params, tokens, mask, starts, lengths, rows: int):
  k, s = tokens.shape
  cache = KVCache.empty(params.config, k, s)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (k, s))
  _, cache = hidden_states(params, tokens, positions, cache, mask)
  # Row r of branch i is row starts[i] + r of its prefill: the output tokens only.
  idx = jnp.minimum(starts[:, None] + jnp.arange(rows)[None, :], s - 1)
  valid = jnp.arange(rows)[None, :] < lengths[:, None]

  def cut(x):  # [K, S] -> [K, rows]
    return jnp.take_along_axis(x, idx, axis=1)

  out = KVCache(
    k=tuple(take_rows(x, idx) for x in cache.k),
    v=tuple(take_rows(x, idx) for x in cache.v),
    positions=cut(cache.positions),
    valid=valid,
    index=jnp.asarray(rows, jnp.int32),
  )
  out_tokens = jnp.where(valid, cut(tokens), 0)
  return Branches(out, lengths, starts, out_tokens, params.fingerprint)


def worker_branches(
  lm, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
) -> Branches:
  """The `Branches` of recorded workers: each prompt + output prefilled from position 0,
  its output rows kept (offset = the prompt's length), as `run_workers` keeps them.

  Lets a later run add synthesis modes to recorded worker outputs without decoding
  again. Prefill and decode compute the same rows up to floating-point order.
  """
  if len(prompts) != len(outputs) or not prompts:
    raise ValueError(f"need one output per prompt, got {len(prompts)} and {len(outputs)}")
  seqs = [list(p) + list(o) for p, o in zip(prompts, outputs, strict=True)]
  longest = max(len(s) for s in seqs)
  if longest > lm.config.max_position_embeddings:
    raise ValueError(f"a worker has {longest} tokens, beyond max_position_embeddings")
  tokens, mask = _right_padded(lm, seqs, decode.bucket(longest))
  starts = np.asarray([len(p) for p in prompts], np.int32)
  lengths = np.asarray([len(o) for o in outputs], np.int32)
  rows = decode.bucket(max(1, int(lengths.max())))
  args = (jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(starts), jnp.asarray(lengths))
  return _rebuild_program(lm.params, *args, rows)


def run_workers_batch(
  lm,
  prompts_per_problem: Sequence[Sequence[Sequence[int]]],
  max_new_tokens: int,
  sampling: decode.Sampling = decode.GREEDY,
  seed: int = 0,
) -> list[WorkerOutputs]:
  """The workers of N problems (K_n prompts each) in one compiled program.

  Decoding is weight-read bound on every backend, so N * K branches in one batch
  cost far less than N runs of K. Each branch stops on its own; greedy outputs
  equal the per-problem `run_workers` (sampled ones draw other keys). Every
  problem's `WorkerOutputs` holds its own branches; `seconds` is the batch's.
  """
  flat = [p for prompts in prompts_per_problem for p in prompts]
  out = run_workers(lm, flat, max_new_tokens, sampling, seed)
  results, start = [], 0
  for prompts in prompts_per_problem:
    rows = list(range(start, start + len(prompts)))
    texts = out.texts[start : start + len(prompts)] if out.texts is not None else None
    tokens = out.tokens[start : start + len(prompts)]
    results.append(WorkerOutputs(tokens, texts, out.branches.take(rows), out.seconds))
    start += len(prompts)
  return results
