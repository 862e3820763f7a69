"""Synthesis for many problems in one compiled program: a benchmark's throughput path.

`synthesize_batch` merges each problem's branches into its own cache (padded to a
common K, branch capacity and row bucket) and decodes the N synthesizer prompts
together; `synthesize_text_batch` does the same for the text baseline's prompts.
Greedy outputs equal the one-problem paths of `psynth_jax.synthesis`; nothing is
timed per problem (`ttft_s` is None: TTFTs come from the one-problem paths).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax import decode
from psynth_jax.mapper import Mapper
from psynth_jax.operators import MergeOperator, resolve
from psynth_jax.synthesis import (
  SynthesisResult,
  check_adapters,
  check_branches,
  check_num_workers,
)
from psynth_jax.workers import Branches


def synthesize_text_batch(
  lm,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int = 64,
  sampling: decode.Sampling = decode.GREEDY,
  seed: int = 0,
) -> list[SynthesisResult]:
  """`synthesize_text` for many prompts (token ids) in one compiled program.

  For throughput (a benchmark's text modes over many problems): greedy outputs
  equal the one-prompt path; nothing is timed per prompt (`ttft_s` is None, and
  `total_s` is the batch's wall time).
  """
  t0 = time.perf_counter()
  outputs = lm.generate([list(p) for p in prompts], max_new_tokens, sampling, seed)
  total = time.perf_counter() - t0
  texts = [lm.decode_text(o) if lm.tokenizer is not None else None for o in outputs]
  return [
    SynthesisResult(o, text, None, total, len(p))
    for o, text, p in zip(outputs, texts, prompts, strict=True)
  ]


def _padded(branches: Branches, k: int, s: int) -> Branches:
  """`branches` with empty branches up to K = k and invalid rows up to capacity s."""
  dk, ds = k - branches.num_branches, s - branches.capacity

  def pad(x, row_axis=1):
    if x.ndim == 0:
      return x
    widths = [(0, dk)] + [(0, ds) if i == row_axis else (0, 0) for i in range(1, x.ndim)]
    return jnp.pad(x, widths)

  padded = jax.tree.map(pad, branches)  # every leaf but the keys and values: rows on axis 1
  cache = branches.cache
  kv = {name: tuple(pad(x, 2) for x in getattr(cache, name)) for name in ("k", "v")}
  return padded.replace(cache=padded.cache.replace(**kv))


@functools.partial(jax.jit, static_argnames=("spec", "rows", "capacity"))
def _batch_program(
  params, branches, tokens, positions, mask, op, lora, rng, spec, rows, capacity, num_workers
):
  def one(b, k):
    cache = op.merge(params, b, rows=rows, capacity=capacity, num_workers=k)
    return jax.tree.map(lambda x: x[0] if x.ndim else x, cache), op.start(b)

  cache, starts = jax.vmap(one)(branches, num_workers)
  cache = cache.replace(index=jnp.asarray(rows, jnp.int32))
  positions = positions + starts[:, None]
  logits, cache = decode.prefill(params, tokens, positions, mask, cache, lora)
  state = decode.start(logits, positions[:, -1] + 1, cache, rng, spec)
  return decode.decode_loop(params, state, spec, lora)


def synthesize_batch(
  lm,
  branches_list: Sequence[Branches],
  synth_prompts: Sequence[Sequence[int]],
  mapper: Mapper | None = None,
  lora=None,
  max_new_tokens: int = 64,
  sampling: decode.Sampling = decode.GREEDY,
  seed: int = 0,
  *,
  num_workers: Sequence[int] | None = None,
  allow_foreign_branches: bool = False,
  merge: MergeOperator | None = None,
) -> list[SynthesisResult]:
  """`synthesize` for N problems in one compiled program (a benchmark's cache modes).

  Each problem's branches are merged into its own cache (padded to a common K,
  branch capacity and row bucket), and the N synthesizer prompts decode together,
  each from its own start position max_i len_i. Greedy outputs equal the
  one-problem path; nothing is timed per problem (`ttft_s` is None).

  Args:
    num_workers: K per problem as the mapper sees it (default: each one's branch count).
    merge: the `MergeOperator` instead of `mapper` (as in `synthesize`).
  """
  op = resolve(mapper, merge)
  if len(branches_list) != len(synth_prompts) or not branches_list:
    raise ValueError(
      f"need one prompt per problem, got {len(branches_list)} and {len(synth_prompts)}"
    )
  for b in branches_list:
    check_branches(lm, b, allow_foreign_branches)
  check_adapters(lm, op, lora)
  ks = [b.num_branches for b in branches_list] if num_workers is None else list(num_workers)
  for b, k in zip(branches_list, ks, strict=True):
    check_num_workers(b, k)
  k = max(b.num_branches for b in branches_list)
  s = max(b.capacity for b in branches_list)
  if any(b.spans is not None for b in branches_list):  # one pytree structure for the stack
    branches_list = [b.with_spans() for b in branches_list]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[_padded(b, k, s) for b in branches_list])
  spec, batch, _ = lm.prepare([list(p) for p in synth_prompts], max_new_tokens, sampling, lora=lora)
  lengths = np.asarray(stacked.lengths)
  rows = decode.bucket(int(lengths.sum(axis=1).max()) + op.extra_rows(k))
  longest = max(int(np.asarray(op.start(b))) for b in branches_list)
  if longest + batch.tokens.shape[1] + max_new_tokens > lm.config.max_position_embeddings:
    raise ValueError(
      "longest branch + synthesizer prompt + max_new_tokens exceed max_position_embeddings"
    )
  capacity = rows + decode.bucket(batch.tokens.shape[1] + max_new_tokens)
  t0 = time.perf_counter()
  state = _batch_program(
    lm.params,
    stacked,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.positions),
    jnp.asarray(batch.mask),
    op,
    lora,
    jax.random.key(seed),
    spec,
    rows,
    capacity,
    jnp.asarray(ks, jnp.int32),
  )
  outputs = decode.trim(jax.device_get(state.tokens), spec.stop_ids)
  total = time.perf_counter() - t0
  return [
    SynthesisResult(o, lm.decode_text(o) if lm.tokenizer is not None else None, None, total, len(p))
    for o, p in zip(outputs, synth_prompts, strict=True)
  ]
