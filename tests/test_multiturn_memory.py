"""Multi-turn worker memory keeps true positions (`psynth_jax/agents/memory.py`, `merge.py`).

* Every memory mode's re-encoded keys equal recomputing the keys of the same conversation
  at the stated positions: "turns" shifts every kept output by the first prompt's length
  (output 1 at 0, later outputs keep their prompt / tool-response gaps), "final" puts the
  last output at 0, "full" keeps the conversation at 0 ...
* ... the merged cache stores those positions, the span (last position + 1) is the
  mapper's length feature and the synthesizer starts at the largest span; the synthesizer
  over multi-turn branches equals a forward over a hand-built cache of the recomputed rows.
* The single-turn path is unchanged: `merge`, `mapped_branch_kv` and
  `synth_start_position` trace to the very program of the formula before multi-turn
  branches (kept below verbatim), and give the same bits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax.agents.memory import MEMORY_MODES, memory_branches, memory_ids
from psynth_jax.agents.session import CacheSession
from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper, apply, check_mapper
from psynth_jax.merge import mapped_branch_kv, merge, reencode, synth_start_position
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import forward
from psynth_jax.synthesis import synthesis_logits, synthesize
from psynth_jax.synthesis_batch import synthesize_batch
from psynth_jax.testing import random_params, tiny_config
from psynth_jax.workers import encode_branches, run_workers

CONFIG = tiny_config(max_position_embeddings=512)
NEW = 5
CAPACITY = 160  # session rows
# Each conversation: the first prompt, then the text after each output (tool responses).
INPUTS = {
  "a": [[7, 31, 2, 44, 12, 5, 9], [3, 3, 8, 21], [9, 1, 40, 16, 5, 38, 50, 11, 2]],
  "b": [[60, 3, 3], list(range(17, 36))],  # the second input crosses a length bucket
}
PROMPT = [30, 31, 2, 17, 44, 6]
ATOL = 5e-5


def _replace(state, fn):
  flat = [
    (path, var.replace(jnp.asarray(fn(path, np.asarray(var[...])))))
    for path, var in nnx.to_flat_state(state)
  ]
  return nnx.from_flat_state(flat)


def random_mapper(kind: str, seed: int = 0) -> Mapper:
  """A mapper far from the identity (its last layer is not zero)."""
  rng = np.random.default_rng(seed)
  mapper = Mapper.create(kind, CONFIG.num_layers, seed=seed)
  return mapper.replace(state=_replace(mapper.state, lambda p, a: rng.normal(0, 1.0, a.shape)))


def random_lora(seed: int = 0) -> LoRAWeights:
  """A LoRA with non-zero B (the init's is zero)."""
  rng = np.random.default_rng(seed)
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=4, alpha=8.0), seed=seed)
  noisy = lambda p, a: rng.normal(0, 0.3, a.shape) if str(p[0]).startswith("b_") else a  # noqa: E731
  return lora.replace(state=_replace(lora.state, noisy))


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(random_params(CONFIG), stop_ids=(), pad_id=0)


@pytest.fixture(scope="module")
def sessions(lm):
  """Conversation a runs every output to the budget (its last token written in the next
  turn); b stops on a stop id its first output emits after a few tokens."""
  a = CacheSession.text(lm, NEW, CAPACITY)
  for ids in INPUTS["a"]:
    a.turn(ids)
  probe = CacheSession.text(lm, NEW, CAPACITY).turn(INPUTS["b"][0])
  j = next(j for j in range(1, len(probe)) if probe[j] not in probe[:j])
  b = CacheSession.text(LanguageModel(lm.params, stop_ids=(probe[j],), pad_id=0), NEW, CAPACITY)
  for ids in INPUTS["b"]:
    b.turn(ids)
  assert not any(t.stopped for t in a.turns) and b.turns[0].stopped
  assert b.turns[0].output == probe[:j]
  return {"a": a, "b": b}


def segments(name, session):
  """[(is_output, ids)] of a conversation, from what was given and what was generated."""
  out = []
  for given, turn in zip(INPUTS[name], session.turns, strict=True):
    out += [(False, given), (True, turn.output)]
  return out


def stated(name, session, mode):
  """Conversation indices `mode` keeps, and the offset the issue states for them."""
  segs = segments(name, session)
  at, spans = 0, []
  for is_out, ids in segs:
    spans.append((is_out, list(range(at, at + len(ids)))))
    at += len(ids)
  if mode == "full":
    return list(range(at)), 0
  if mode == "turns":
    return [i for is_out, idx in spans if is_out for i in idx], len(segs[0][1])
  last = spans[-1][1]
  return last, last[0] if last else at


@jax.jit
def _prefill(params, tokens, positions):
  cache = KVCache.empty(params.config, 1, tokens.shape[1])
  return forward(params, tokens, positions, cache)[1]


def recomputed(lm, session, shift):
  """k, v (L x [G, N, H]) of a plain prefill of the whole conversation at positions t - shift."""
  ids = [w.id for w in session.written]
  n = len(ids)
  tokens = np.zeros((1, 256), np.int32)
  tokens[0, :n] = ids
  cache = _prefill(lm.params, tokens, (np.arange(256, dtype=np.int32) - shift)[None])
  return [np.asarray(x[0, :, :n]) for x in cache.k], [np.asarray(x[0, :, :n]) for x in cache.v]


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_reencoded_keys_equal_recomputing_them_at_the_stated_positions(lm, sessions, mode):
  branches = memory_branches([sessions["a"], sessions["b"]], mode)
  k, v = mapped_branch_kv(branches, CONFIG, None)
  merged = merge(branches, CONFIG, None, rows=64, capacity=64)
  merged_positions, spans = [], []
  for i, name in enumerate(["a", "b"]):
    session = sessions[name]
    conversation = [ids for _, seg in segments(name, session) for ids in seg]
    assert [w.id for w in session.written] == conversation  # every token written, in order
    kept, offset = stated(name, session, mode)
    n = len(kept)
    assert int(branches.lengths[i]) == n and int(branches.offsets[i]) == offset
    assert memory_ids(session, mode) == [conversation[j] for j in kept]
    np.testing.assert_array_equal(branches.cache.positions[i, :n], kept)  # stored: original
    rk, rv = recomputed(lm, session, offset)
    for layer in range(CONFIG.num_layers):
      np.testing.assert_allclose(k[layer][i, :, :n], rk[layer][:, kept], atol=ATOL)
      np.testing.assert_allclose(v[layer][i, :, :n], rv[layer][:, kept], atol=ATOL)
    merged_positions += [j - offset for j in kept]
    spans.append(kept[-1] - offset + 1 if kept else 0)
  total = len(merged_positions)
  np.testing.assert_array_equal(merged.positions[0, :total], merged_positions)
  np.testing.assert_array_equal(branches.spans, spans)
  assert int(synth_start_position(branches)) == max(spans)
  if mode == "turns":  # gaps: the spans exceed the kept rows
    assert (np.asarray(branches.spans) > np.asarray(branches.lengths)).all()
  else:  # one contiguous block from 0
    np.testing.assert_array_equal(branches.spans, branches.lengths)


def test_the_span_is_the_mappers_length_feature(sessions):
  branches = memory_branches([sessions["a"], sessions["b"]], "turns")
  mapper = random_mapper("affine")
  got_k, got_v = mapped_branch_kv(branches, CONFIG, mapper, jnp.asarray(2))
  k = tuple(reencode(x, branches.offsets, CONFIG) for x in branches.cache.k)
  v = branches.cache.v
  check_mapper(mapper, CONFIG.num_layers)
  by_span = mapper.coefficients(k, v, branches.spans, jnp.asarray(2))
  by_length = mapper.coefficients(k, v, branches.lengths, jnp.asarray(2))
  assert np.abs(np.asarray(by_span) - np.asarray(by_length)).max() > 1e-3
  want_k, want_v = apply(by_span, k, v)
  for a, b in zip(got_k + got_v, want_k + want_v, strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_synthesizer_reads_multiturn_rows_at_their_positions(lm, sessions):
  """synthesis over "turns" branches == a forward over a hand-built cache of the recomputed
  rows at the stated positions, the prompt from max_i span_i on (mapper + LoRA)."""
  branches = memory_branches([sessions["a"], sessions["b"]], "turns")
  ks, vs, positions, spans = [], [], [], []
  for name in ("a", "b"):
    kept, offset = stated(name, sessions[name], "turns")
    rk, rv = recomputed(lm, sessions[name], offset)
    ks.append([x[:, kept] for x in rk])
    vs.append([x[:, kept] for x in rv])
    positions += [j - offset for j in kept]
    spans.append(kept[-1] - offset + 1)
  mapper, lora = random_mapper("affine", 5), random_lora(5)
  # The mapper maps each branch by its span's coefficients.
  k_re = tuple(reencode(x, branches.offsets, CONFIG) for x in branches.cache.k)
  coeffs = mapper.coefficients(k_re, branches.cache.v, branches.spans, jnp.asarray(2))
  mapped = [
    apply(coeffs[i : i + 1], tuple(x[None] for x in ks[i]), tuple(x[None] for x in vs[i]))
    for i in range(2)
  ]
  total, t = len(positions), len(PROMPT)

  def stack(kv):  # per branch L x [1, G, n, H] -> L x [1, G, total + t, H]
    return tuple(
      jnp.pad(jnp.concatenate(layer, 2), ((0, 0), (0, 0), (0, t), (0, 0)))
      for layer in zip(*kv, strict=True)
    )

  cache = KVCache(
    k=stack([m[0] for m in mapped]),
    v=stack([m[1] for m in mapped]),
    positions=jnp.pad(jnp.asarray(positions, jnp.int32), (0, t))[None],
    valid=jnp.pad(jnp.ones((total,), bool), (0, t))[None],
    index=jnp.asarray(total, jnp.int32),
  )
  start = max(spans)
  want, _ = forward(
    lm.params, jnp.asarray([PROMPT]), (start + np.arange(t))[None], cache, None, lora
  )
  got = synthesis_logits(lm, branches, PROMPT, mapper=mapper, lora=lora)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want[0]), atol=1e-4, rtol=1e-4)


def test_one_full_conversation_branch_equals_the_same_tokens_as_text(lm, sessions):
  branch = memory_branches([sessions["a"]], "full")
  conversation = memory_ids(sessions["a"], "full")
  got = np.asarray(synthesis_logits(lm, branch, PROMPT))
  want = np.asarray(lm.logits([conversation + PROMPT]))[0, len(conversation) :]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_bad_memory_requests_are_refused(lm, sessions):
  with pytest.raises(ValueError, match="memory mode"):
    memory_branches([sessions["a"]], "everything")
  with pytest.raises(ValueError, match="no turns"):
    memory_branches([CacheSession.text(lm, NEW, CAPACITY)], "final")
  with pytest.raises(ValueError, match="spans"):
    bad = memory_branches([sessions["a"]], "turns")
    synthesis_logits(lm, bad.replace(spans=bad.lengths - 1), PROMPT)


# --- the single-turn path is unchanged ------------------------------------------------
# The formula before multi-turn branches, verbatim (merge.py at 7647a1f).


def _old_mapped_branch_kv(branches, config, mapper, num_workers=None):
  k = tuple(reencode(kl, branches.offsets, config) for kl in branches.cache.k)
  v = branches.cache.v
  if mapper is not None and not mapper.is_identity:
    check_mapper(mapper, config.num_layers)
    if num_workers is None:
      num_workers = jnp.asarray(branches.num_branches)
    k, v = apply(mapper.coefficients(k, v, branches.lengths, num_workers), k, v)
  return k, v


def _old_merge(branches, config, mapper, rows, capacity, num_workers=None):
  k, v = _old_mapped_branch_kv(branches, config, mapper, num_workers)
  lengths = branches.lengths
  starts = jnp.cumsum(lengths) - lengths  # [K]
  total = lengths.sum()
  r = jnp.arange(rows)
  branch = jnp.clip(jnp.searchsorted(jnp.cumsum(lengths), r, side="right"), 0, lengths.shape[0] - 1)
  local = jnp.clip(r - starts[branch], 0, branches.capacity - 1)  # [rows]
  valid = r < total

  def gather(x):  # [K, G, S, H] -> [1, G, capacity, H] (the cache's layout since 2026-12)
    packed = x[branch, :, local]
    return jnp.pad(packed, ((0, capacity - rows), (0, 0), (0, 0))).transpose(1, 0, 2)[None]

  return KVCache(
    k=tuple(gather(kl) for kl in k),
    v=tuple(gather(vl) for vl in v),
    positions=jnp.pad(jnp.where(valid, local, 0), (0, capacity - rows))[None].astype(jnp.int32),
    valid=jnp.pad(valid, (0, capacity - rows))[None],
    index=jnp.asarray(rows, jnp.int32),
  )


def _old_synth_start_position(branches):
  return branches.lengths.max()


@pytest.fixture(scope="module")
def single_turn(lm):
  """Single-turn branches both ways: decoded workers (offsets > 0, one empty) and prefilled texts."""
  workers = run_workers(lm, [[5, 9, 2], [1] * 11, [40, 41]], NEW).branches
  workers = workers.replace(lengths=workers.lengths.at[2].set(0))
  return {"workers": workers, "texts": encode_branches(lm, [[4, 8, 15, 16, 23], [42] * 12, [9]])}


@pytest.mark.parametrize("kind", ["identity", "affine", "head_affine"])
@pytest.mark.parametrize("source", ["workers", "texts"])
def test_single_turn_merge_is_the_old_formula_bit_for_bit(single_turn, kind, source):
  branches = single_turn[source]
  assert branches.spans is None
  mapper = None if kind == "identity" else random_mapper(kind, 7)
  nw = jnp.asarray(4, jnp.int32)
  for new, old, args, static in [
    (merge, _old_merge, (branches, CONFIG, mapper, 32, 48, nw), (1, 3, 4)),
    (mapped_branch_kv, _old_mapped_branch_kv, (branches, CONFIG, mapper, nw), (1,)),
    (synth_start_position, _old_synth_start_position, (branches,), ()),
  ]:
    jaxprs = [str(jax.make_jaxpr(f, static_argnums=static)(*args)) for f in (new, old)]
    assert jaxprs[0] == jaxprs[1], new.__name__  # the very same program ...
    for a, b in zip(jax.tree.leaves(new(*args)), jax.tree.leaves(old(*args)), strict=True):
      np.testing.assert_array_equal(a, b)  # ... and the same bits
  # The same branches told their spans (= lengths) read their stored positions: same cache.
  with_spans = merge(branches.with_spans(), CONFIG, mapper, 32, 48, nw)
  old = _old_merge(branches, CONFIG, mapper, 32, 48, nw)
  for a, b in zip(jax.tree.leaves(with_spans), jax.tree.leaves(old), strict=True):
    np.testing.assert_array_equal(a, b)


def test_single_turn_synthesis_is_unchanged_by_setting_spans(lm, single_turn):
  branches = single_turn["workers"]
  mapper, lora = random_mapper("head_affine", 8), random_lora(8)
  plain = synthesize(lm, branches, PROMPT, mapper, lora, NEW)
  told = synthesize(lm, branches.with_spans(), PROMPT, mapper, lora, NEW)
  assert plain.tokens == told.tokens


def test_a_batch_mixing_multiturn_and_single_turn_branches_synthesizes_each_alone(
  lm, sessions, single_turn
):
  problems = [
    (memory_branches([sessions["a"], sessions["b"]], "turns"), PROMPT),
    (single_turn["texts"], [11, 12, 13]),
  ]
  mapper, lora = random_mapper("affine", 9), random_lora(9)
  got = synthesize_batch(lm, [b for b, _ in problems], [p for _, p in problems], mapper, lora, NEW)
  for (branches, prompt), result in zip(problems, got, strict=True):
    assert result.tokens == synthesize(lm, branches, prompt, mapper, lora, NEW).tokens
