"""Decoding invariants: cached == uncached, fused loop == step loop, samplers keep their sets.

One tiny model exercises every attention option at once (GQA, qkv bias, q/k
norm, Llama-3 RoPE scaling) with random norm scales and biases, so that a bug
in any of them shows. Compiled programs are shared between tests by keeping
shapes and decode specs equal where the invariant allows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax import decode
from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel
from psynth_jax.model.config import RopeScaling
from psynth_jax.model.transformer import forward
from psynth_jax.testing import random_params, tiny_config

CONFIG = tiny_config(
  model_type="qwen2",
  qkv_bias=True,
  qk_norm=True,
  rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 16),
  max_position_embeddings=64,
)
NEW = 8  # max_new_tokens used throughout (one compiled loop per spec)
PROMPTS = [[5, 9, 1], [3, 14, 15, 9, 2, 6, 53], [27, 18, 28, 18, 28, 45, 9, 0, 45, 23, 53, 60]]


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(random_params(CONFIG), stop_ids=(), pad_id=0)


def _positions(t, batch=1):
  return np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t))


_jit_forward = jax.jit(forward)


def test_cached_decode_equals_uncached_forward(lm):
  tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 12)).astype(np.int32)
  positions = _positions(12, 2)
  full, _ = _jit_forward(lm.params, tokens, positions)  # [B, T, V]

  cache = KVCache.empty(CONFIG, 2, 16)
  one_by_one = []
  for t in range(12):
    logits, cache = _jit_forward(lm.params, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
    one_by_one.append(logits)
  np.testing.assert_allclose(np.concatenate(one_by_one, 1), full, atol=1e-4, rtol=1e-4)
  assert int(cache.index) == 12
  np.testing.assert_array_equal(cache.valid[:, :12], True)
  np.testing.assert_array_equal(cache.valid[:, 12:], False)

  cache = KVCache.empty(CONFIG, 2, 16)
  chunks = []
  for t in range(0, 12, 4):
    logits, cache = _jit_forward(lm.params, tokens[:, t : t + 4], positions[:, t : t + 4], cache)
    chunks.append(logits)
  np.testing.assert_allclose(np.concatenate(chunks, 1), full, atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(cache.positions[:, :12], positions)


def _begin(lm, prompts, spec):
  batch = decode.pad_prompts(prompts, decode.bucket(max(map(len, prompts))), lm.pad_id)
  capacity = decode.bucket(batch.tokens.shape[1] + spec.max_new_tokens)
  args = (batch.tokens, batch.positions, batch.mask, jax.random.key(7), spec, capacity)
  return decode.jit_begin(lm.params, *args), args


SAMPLED = decode.Sampling(temperature=0.9, top_k=12, top_p=0.9)


def test_fused_loop_equals_step_loop(lm):
  """Sampled, with stop ids, batch of three lengths (greedy: `test_stream_equals_generate`)."""
  stop_ids = (3, 17, 40)
  spec = decode.DecodeSpec(NEW, SAMPLED, stop_ids, pad_id=0)
  start, args = _begin(lm, PROMPTS, spec)
  for state in decode.step_loop(lm.params, start, spec):
    stepped_tokens, stepped_step = np.asarray(state.tokens), int(state.step)
  # The fused program: prefill + first sample + lax.while_loop, one jit (what `generate` runs).
  fused = decode.generate_tokens(lm.params, *args)
  np.testing.assert_array_equal(np.asarray(fused.tokens), stepped_tokens)
  assert int(fused.step) == stepped_step
  assert np.all((stepped_tokens >= 0) & (stepped_tokens < CONFIG.vocab_size))
  for row in stepped_tokens.tolist():  # sequences that stopped are padded after their stop id
    cut = next((i for i, t in enumerate(row) if t in stop_ids), NEW - 1)
    assert all(t == 0 for t in row[cut + 1 :])


def _kept_set(logits: np.ndarray, sampling: decode.Sampling, p_slack: float) -> np.ndarray:
  """Plain numpy (float64) top-k then top-p kept mask of one row; p_slack widens/narrows p."""
  z = logits.astype(np.float64) / sampling.temperature
  keep = np.ones(z.shape, bool)
  if sampling.top_k is not None:
    keep &= z >= np.sort(z)[::-1][min(sampling.top_k, z.size) - 1]
  if sampling.top_p is not None:
    order = np.argsort(-np.where(keep, z, -np.inf))
    p = np.exp(z[order] - z[order[0]]) * keep[order]
    p /= p.sum()
    mass_before = np.cumsum(p) - p
    nucleus = np.zeros(z.shape, bool)
    nucleus[order[mass_before < sampling.top_p + p_slack]] = True
    keep &= nucleus
  return keep


SAMPLERS = [
  decode.Sampling(temperature=1.0, top_k=5),
  decode.Sampling(temperature=0.7, top_p=0.5),
  decode.Sampling(temperature=1.3, top_k=8, top_p=0.8),
]


@pytest.mark.parametrize("sampling", SAMPLERS, ids=lambda s: f"k{s.top_k}_p{s.top_p}")
def test_samplers_never_emit_outside_the_kept_set(sampling):
  sample = jax.jit(decode.sample, static_argnames="sampling")
  filt = jax.jit(lambda x: decode.filter_logits(x / sampling.temperature, sampling))
  rows, vocab = 64, 40
  off_argmax = 0
  for seed in range(25):
    logits = np.random.default_rng(seed).normal(0, 2.0, (rows, vocab)).astype(np.float32)
    tokens = np.asarray(sample(jnp.asarray(logits), jax.random.key(seed), sampling))
    finite = np.isfinite(np.asarray(filt(jnp.asarray(logits))))
    for r in range(rows):
      strict = _kept_set(logits[r], sampling, -1e-5)
      loose = _kept_set(logits[r], sampling, 1e-5)
      assert np.all(finite[r] >= strict) and np.all(finite[r] <= loose), (seed, r)
      assert loose[tokens[r]], f"seed {seed} row {r}: token {tokens[r]} outside the kept set"
    off_argmax += int((tokens != logits.argmax(-1)).sum())
  assert off_argmax > 0  # it really samples, not only the argmax


def test_top_k_one_is_greedy():
  logits = np.random.default_rng(0).normal(0, 2.0, (64, 40)).astype(np.float32)
  sample = jax.jit(decode.sample, static_argnames="sampling")
  for seed in range(5):
    got = sample(jnp.asarray(logits), jax.random.key(seed), decode.Sampling(1.0, top_k=1))
    np.testing.assert_array_equal(got, logits.argmax(-1))


def test_batch_of_different_lengths_equals_each_prompt_alone(lm):
  batched = lm.generate(PROMPTS, NEW)
  assert [len(t) for t in batched] == [NEW] * len(PROMPTS)  # no stop ids
  for i, prompt in enumerate(PROMPTS):
    assert batched[i] == lm.generate([prompt], NEW)[0], f"prompt {i}"


def test_length_buckets_give_the_same_tokens(lm):
  spec = decode.DecodeSpec(NEW)
  outs = []
  for length in (16, 32):
    batch = decode.pad_prompts(PROMPTS, length)
    state = decode.generate_tokens(
      lm.params,
      batch.tokens,
      batch.positions,
      batch.mask,
      jax.random.key(0),
      spec,
      decode.bucket(length + NEW),
    )
    outs.append(np.asarray(state.tokens))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], np.asarray(lm.generate(PROMPTS, NEW)))


def test_stop_id_ends_a_sequence_and_later_slots_are_pad(lm):
  base = lm.generate(PROMPTS, NEW)
  row = base[1]
  k = next(i for i in range(2, NEW) if row[i] not in row[:i])  # first occurrence at k >= 2
  stop = row[k]
  pad = next(t for t in range(CONFIG.vocab_size) if all(t not in r for r in base))
  spec = decode.DecodeSpec(NEW, decode.Sampling(), (stop,), pad_id=pad)
  batch = decode.pad_prompts(PROMPTS, decode.bucket(len(PROMPTS[-1])), pad)
  capacity = decode.bucket(batch.tokens.shape[1] + NEW)  # as `generate` picks it
  state = decode.generate_tokens(
    lm.params, batch.tokens, batch.positions, batch.mask, jax.random.key(0), spec, capacity
  )
  raw = np.asarray(state.tokens)
  assert raw[1, :k].tolist() == row[:k]
  assert raw[1, k] == stop
  assert np.all(raw[1, k + 1 :] == pad)
  assert bool(state.done[1])
  for i, r in enumerate(base):  # the other rows run on, cut at their own first stop
    cut = r.index(stop) if stop in r else NEW
    assert raw[i, : cut + 1].tolist() == r[: cut + 1]
    assert np.all(raw[i, cut + 1 :] == pad)
  stopped = LanguageModel(lm.params, stop_ids=(stop,), pad_id=pad)
  assert stopped.generate(PROMPTS, NEW) == [r[: r.index(stop)] if stop in r else r for r in base]


def test_stream_equals_generate(lm):
  """Greedy: the Python step loop (stream) against the fused program (generate)."""
  full = lm.generate([PROMPTS[1]], NEW)[0]
  stop = next(t for i, t in enumerate(full) if i >= 2 and t not in full[:i])
  stopped = LanguageModel(lm.params, stop_ids=(stop,), pad_id=0)
  assert list(stopped.stream(PROMPTS[1], NEW)) == full[: full.index(stop)]


def test_bad_inputs_raise_clear_errors(lm):
  limit = CONFIG.max_position_embeddings
  with pytest.raises(ValueError, match="max_position_embeddings"):
    lm.generate([[1] * (limit - 2)], NEW)  # prompt fits, prompt + new tokens do not
  with pytest.raises(ValueError, match="max_position_embeddings|longer|more than"):
    lm.generate([[1] * (limit + 5)], 1)
  with pytest.raises(ValueError, match="empty"):
    lm.generate([[1, 2], []], NEW)
  with pytest.raises(ValueError, match="no prompts"):
    lm.generate([], NEW)
  with pytest.raises(ValueError, match=r"token ids must be in \[0, 64\)"):
    lm.generate([[1, CONFIG.vocab_size]], NEW)
  with pytest.raises(ValueError, match="token ids"):
    lm.generate([[-1, 2]], NEW)
  with pytest.raises(ValueError, match="token ids"):
    lm.logits([[3, 99]])
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    lm.logits([3, 4])
  with pytest.raises(ValueError, match="max_new_tokens"):
    lm.generate([[1, 2]], 0)
  with pytest.raises(ValueError, match="top_p"):
    lm.generate([[1, 2]], NEW, decode.Sampling(temperature=1.0, top_p=0.0))
  with pytest.raises(ValueError, match="top_k"):
    lm.generate([[1, 2]], NEW, decode.Sampling(temperature=1.0, top_k=0))
  with pytest.raises(ValueError, match="temperature"):
    lm.generate([[1, 2]], NEW, decode.Sampling(temperature=-1.0))
  with pytest.raises(ValueError, match="more than the padded length"):
    decode.pad_prompts([[1, 2, 3]], 2)


def test_logits_of_an_empty_sequence_is_a_clear_error(lm):
  """T = 0: a ValueError, not a crash deep inside attention."""
  with pytest.raises(ValueError, match="non-empty"):
    lm.logits(np.zeros((2, 0), np.int32))


def test_bucket_covers_the_length_and_is_stable():
  buckets = [decode.bucket(n) for n in range(0, 3000)]
  for n, b in enumerate(buckets):
    assert b >= max(n, 16)
    assert decode.bucket(b) == b  # a bucket is its own bucket
  assert buckets == sorted(buckets)
  assert len(set(buckets)) < len(buckets) / 8  # lengths do share programs
