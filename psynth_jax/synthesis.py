"""Synthesis: from K branch caches (Parallel-Synthesis) or from concatenated text (baseline).

Cache path (`synthesize`): re-encode + map + merge the branch caches, prefill
the synthesizer prompt at positions max_i len_i + j (max_i span_i for
multi-turn branches, `psynth_jax.merge`) with the synthesizer's LoRA, sample,
then decode. The merge is a `psynth_jax.operators.MergeOperator` (`merge=`);
`mapper=m` is shorthand for the paper's, `Reencode(m)`. Text path
(`synthesize_text`): the base model prefills the whole concatenated prompt and
decodes with the same decoder and the same sampling.

TTFT (time to first token of the synthesizer) is measured from "branch caches
ready" to "first token on the host", from token ids on both paths (the text
path's tokenisation is timed apart, in `stages["tokenize"]`); worker time is
excluded. Cache path: merge + prefill of the synthesizer prompt + first
sample; text path: prefill of the whole concatenated prompt + first sample. By
default each path runs as two compiled programs: everything up to the first
token (one jit), then the `lax.while_loop` decode, so the first token reaches
the host before decoding finishes. `fused=True` compiles the whole path as one
program (no TTFT). Many problems in one program: `psynth_jax.synthesis_batch`.
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
from psynth_jax.mapper import Mapper
from psynth_jax.model.lora import check_lora
from psynth_jax.model.remat import remat_layer
from psynth_jax.model.transformer import Params, hidden_states, unembed
from psynth_jax.operators import MergeOperator, resolve
from psynth_jax.workers import Branches


@dataclasses.dataclass
class SynthesisResult:
  tokens: list[int]  # generated ids (stop id excluded)
  text: str | None
  ttft_s: float | None  # caches ready (or text given) -> first token on host
  total_s: float
  prompt_tokens: int  # tokens the synthesizer prefilled
  stages: dict[str, float] = dataclasses.field(default_factory=dict)


def check_adapters(lm, mapper: Mapper | MergeOperator | None, lora) -> None:
  """Clear errors for a mapper (or merge operator) or LoRA made for another model."""
  resolve(mapper).check(lm.config)
  check_lora(lora, lm.config)


def check_num_workers(branches: Branches, num_workers: int | None) -> None:
  """K as the mapper sees it must count every non-empty branch and no more than all."""
  if num_workers is None:
    return
  nonempty = int((np.asarray(branches.lengths) > 0).sum())
  if num_workers < 1 or not nonempty <= num_workers <= branches.num_branches:
    raise ValueError(
      f"num_workers={num_workers} must be between the {nonempty} non-empty branches and"
      f" the {branches.num_branches} branches given"
    )


def _first_token(
  params: Params,
  branches: Branches,
  tokens,
  positions,
  mask,
  op,
  lora,
  rng,
  spec,
  rows,
  capacity,
  num_workers=None,
):
  cache = op.merge(params, branches, rows=rows, capacity=capacity, num_workers=num_workers)
  positions = positions + op.start(branches)
  logits, cache = decode.prefill(params, tokens, positions, mask, cache, lora)
  return decode.start(logits, positions[:, -1] + 1, cache, rng, spec)


_jit_first_token = jax.jit(_first_token, static_argnames=("spec", "rows", "capacity"))


@functools.partial(jax.jit, static_argnames=("spec", "rows", "capacity"))
def _fused(
  params, branches, tokens, positions, mask, op, lora, rng, spec, rows, capacity, num_workers
):
  state = _first_token(
    params, branches, tokens, positions, mask, op, lora, rng, spec, rows, capacity, num_workers
  )
  return decode.decode_loop(params, state, spec, lora)


@functools.partial(jax.jit, static_argnames=("rows", "capacity"))
def _jit_merge(params, branches, op, rows, capacity):
  return op.merge(params, branches, rows=rows, capacity=capacity)


def check_branches(lm, branches: Branches, allow_foreign_branches: bool = False) -> None:
  """Clear errors for branches that this model cannot read.

  Branches made by another model (other weights, or another RoPE) have the
  right shapes but the wrong contents; their `fingerprint` tells them apart.
  """
  if branches.num_branches == 0:
    raise ValueError("synthesis needs at least one branch")
  branches.cache.check_compatible(lm.config)
  if branches.fingerprint != lm.params.fingerprint and not allow_foreign_branches:
    raise ValueError(
      f"these branches were made by another model (fingerprint {branches.fingerprint!r}) than"
      f" the synthesizer ({lm.params.fingerprint!r}); run the workers with the synthesizer's"
      " base model, or pass allow_foreign_branches=True if that is intended"
    )
  lengths = np.asarray(branches.lengths)
  if lengths.min() < 0 or lengths.max() > branches.capacity:
    raise ValueError(
      f"branch lengths {lengths.tolist()} do not fit the branch cache capacity {branches.capacity}"
    )
  if branches.spans is not None:
    spans = np.asarray(branches.spans)
    if spans.shape != lengths.shape or (spans < lengths).any():
      raise ValueError(f"branch spans {spans.tolist()} must be >= the lengths {lengths.tolist()}")


def branch_rows(branches: Branches, op: MergeOperator | None = None) -> int:
  """Static rows reserved for the merged branches: a bucket of sum_i len_i (+ the rows
  `op` adds after them, `MergeOperator.extra_rows`)."""
  extra = 0 if op is None else op.extra_rows(branches.num_branches)
  return decode.bucket(int(np.asarray(branches.lengths).sum()) + extra)


def synthesize(
  lm,
  branches: Branches,
  synth_prompt: Sequence[int],
  mapper: Mapper | None = None,
  lora=None,
  max_new_tokens: int = 64,
  sampling: decode.Sampling = decode.GREEDY,
  seed: int = 0,
  *,
  fused: bool = False,
  profile: bool = False,
  num_workers: int | None = None,
  rows: int | None = None,
  allow_foreign_branches: bool = False,
  first_token_only: bool = False,
  merge: MergeOperator | None = None,
) -> SynthesisResult:
  """Parallel-Synthesis: the synthesizer reads the merged branch caches.

  The arguments after `seed` are keyword-only: measurement (`fused`, `profile`,
  `first_token_only`),
  compiled-program reuse (`num_workers`, `rows`) and a safety override.

  Args:
    lm: the `LanguageModel` (base weights; workers made `branches` with it).
    branches: the K worker branches (`run_workers` or `encode_branches`).
    synth_prompt: the synthesizer's own prompt ids (restating the question).
    mapper: cache mapper (None: identity, the naive merge); shorthand for
      `merge=operators.Reencode(mapper)`.
    lora: the synthesizer's `LoRAWeights` (None: base model).
    fused: one compiled program for the whole path (then `ttft_s` is None).
    profile: also time the merge and the prefill as separate programs.
    num_workers: K as the mapper sees it (default: every branch, empty ones
      included). Padding the branches to a fixed K with empty ones and passing
      the real K here lets one compiled program serve every K.
    rows: static rows for the merged branches (default: a bucket of sum_i len_i);
      a fixed value serves many examples with one compiled program.
    allow_foreign_branches: accept branches whose fingerprint is not this
      model's (made by other weights); otherwise that is a ValueError.
    first_token_only: stop after the first token (TTFT measurements: the cache
      keeps the capacity `max_new_tokens` asks for, so the prefill is the same).
    merge: the `MergeOperator` (`psynth_jax.operators`) instead of `mapper`.
  """
  op = resolve(mapper, merge)
  check_branches(lm, branches, allow_foreign_branches)
  check_adapters(lm, op, lora)
  check_num_workers(branches, num_workers)
  spec, batch, _ = lm.prepare([synth_prompt], max_new_tokens, sampling, lora=lora)
  used = int(np.asarray(branches.lengths).sum())
  extra = op.extra_rows(branches.num_branches)
  rows = branch_rows(branches, op) if rows is None else rows
  if rows < used + extra:
    raise ValueError(
      f"rows={rows} cannot hold the {used} branch tokens"
      + (f" and the merge's {extra} rows of its own" if extra else "")
    )
  start = int(np.asarray(op.start(branches)))
  if start + batch.lengths[0] + max_new_tokens > lm.config.max_position_embeddings:
    raise ValueError(
      "longest branch + synthesizer prompt + max_new_tokens exceed max_position_embeddings"
    )
  capacity = rows + decode.bucket(batch.tokens.shape[1] + max_new_tokens)
  args = (
    lm.params,
    branches,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.positions),
    jnp.asarray(batch.mask),
    op,
    lora,
    jax.random.key(seed),
    spec,
    rows,
    capacity,
    None if num_workers is None else jnp.asarray(num_workers, jnp.int32),
  )
  stages = _profile_cache_path(lm, branches, op, rows, capacity) if profile else {}
  program = _fused if fused else _jit_first_token
  run = functools.partial(program, *args)
  return _run(lm, run, fused, spec, lora, len(synth_prompt), stages, first_token_only)


def synthesize_text(
  lm,
  prompt: str | Sequence[int],
  max_new_tokens: int = 64,
  sampling: decode.Sampling = decode.GREEDY,
  seed: int = 0,
  *,
  fused: bool = False,
  first_token_only: bool = False,
) -> SynthesisResult:
  """Text-concatenation baseline: the base model prefills the whole prompt.

  `prompt` is text or token ids. Text is tokenised before the clock starts and
  its time is reported as `stages["tokenize"]`, never inside `ttft_s`, so that
  both paths are timed from token ids (the cache path's prompt is ids too).
  `fused` and `first_token_only` as in `synthesize`.
  """
  t0 = time.perf_counter()
  ids = lm.require_tokenizer().encode(prompt) if isinstance(prompt, str) else list(prompt)
  stages = {"tokenize": time.perf_counter() - t0} if isinstance(prompt, str) else {}
  spec, batch, capacity = lm.prepare([ids], max_new_tokens, sampling)
  args = (
    lm.params,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.positions),
    jnp.asarray(batch.mask),
    jax.random.key(seed),
    spec,
    capacity,
  )
  program = decode.generate_tokens if fused else decode.jit_begin
  run = functools.partial(program, *args)
  return _run(lm, run, fused, spec, None, len(ids), stages, first_token_only)


def _run(lm, program, fused, spec, lora, n_prompt, stages, first_only=False) -> SynthesisResult:
  """Times `program()`: the whole generation (fused) or the first token, then the decode
  loop (unless `first_only`)."""
  if fused and first_only:
    raise ValueError("first_token_only times the first token: it cannot be fused")
  t0 = time.perf_counter()
  if fused:
    state = program()
    ttft = None
  else:
    state = program()
    jax.device_get(state.tokens[0, 0])  # the first token on the host ends the TTFT
    ttft = time.perf_counter() - t0
    if not first_only:
      state = decode.jit_decode_loop(lm.params, state, spec, lora)
  tokens = decode.trim(jax.device_get(state.tokens), spec.stop_ids)[0]
  if first_only:
    tokens = tokens[:1]
  total = time.perf_counter() - t0
  text = lm.decode_text(tokens) if lm.tokenizer is not None else None
  return SynthesisResult(tokens, text, ttft, total, n_prompt, stages)


def _profile_cache_path(lm, branches, op, rows, capacity) -> dict[str, float]:
  t0 = time.perf_counter()
  jax.block_until_ready(_jit_merge(lm.params, branches, op, rows, capacity))
  return {"reencode_map_merge": time.perf_counter() - t0}


# ---------------------------------------------------------------------------
# Logits over the synthesizer's tokens (tests, training).


def latent_hidden(
  params: Params,
  branches: Branches,  # leading batch axis B over examples: [B, K, ...]
  tokens: jax.Array,  # [B, T] right-padded synthesizer tokens
  mask: jax.Array,  # [B, T]
  mapper: Mapper | MergeOperator | None,  # a mapper: the paper's operator, Reencode(mapper)
  lora,
  rows: int,
  num_workers: jax.Array | None = None,  # [B], K per example (default: K)
  lora_rng: jax.Array | None = None,
  remat: str = "none",  # psynth_jax.model.remat.POLICIES (training)
) -> jax.Array:
  """Final hidden states [B, T, D] of the synthesizer over merged branch caches.

  `rows` holds the branch tokens; the operator's own rows (`extra_rows`) come on top.
  """
  b, t = tokens.shape
  op = resolve(mapper)
  if num_workers is None:
    num_workers = jnp.full((b,), branches.lengths.shape[1])
  rows = rows + op.extra_rows(branches.lengths.shape[1])

  def one(br, nw):
    cache = op.merge(params, br, rows=rows, capacity=rows + t, num_workers=nw)
    return jax.tree.map(lambda x: x[0] if x.ndim else x, cache), op.start(br)

  # The merge keeps only its (bfloat16) inputs for the backward when remat is on, not its
  # float32 working copies of every branch row.
  caches, starts = jax.vmap(remat_layer(one, remat))(branches, num_workers)
  cache = caches.replace(index=jnp.asarray(rows, jnp.int32))  # vmap stacked the index
  positions = starts[:, None] + jnp.arange(t)[None, :]
  x, _ = hidden_states(params, tokens, positions, cache, mask, lora, lora_rng, remat)
  return x


@functools.partial(jax.jit, static_argnames=("rows",))
def _synthesis_logits(params, branches, tokens, op, lora, rows):
  batched = jax.tree.map(lambda x: x[None], branches)
  x = latent_hidden(params, batched, tokens, jnp.ones(tokens.shape, bool), op, lora, rows)
  return unembed(params, x, lora)[0]


def synthesis_logits(
  lm,
  branches: Branches,
  synth_prompt: Sequence[int],
  mapper=None,
  lora=None,
  allow_foreign_branches: bool = False,
  merge: MergeOperator | None = None,
):
  """Logits [T, V] over the synthesizer prompt tokens, reading the merged branch caches
  (`merge`: a `MergeOperator` instead of `mapper`, as in `synthesize`)."""
  op = resolve(mapper, merge)
  check_branches(lm, branches, allow_foreign_branches)
  check_adapters(lm, op, lora)
  if len(synth_prompt) == 0:
    raise ValueError("the synthesizer prompt is empty")
  tokens = jnp.asarray([list(synth_prompt)], jnp.int32)
  lm.check_ids(tokens, lora)
  rows = decode.bucket(int(np.asarray(branches.lengths).sum()))  # latent_hidden adds extra_rows
  return _synthesis_logits(lm.params, branches, tokens, op, lora, rows)
