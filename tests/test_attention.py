"""The attention implementations compute one function: blocked == dense on every mask the
model builds (merged caches, causal, sliding windows, padding), forward and backward, and the
blocked backward keeps no score matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax.language_model import LanguageModel
from psynth_jax.model import attention_ops
from psynth_jax.model.attention_ops import attention, blocked_attention, dense_attention
from psynth_jax.model.remat import nbytes, residuals
from psynth_jax.testing import random_params, tiny_config


def _qkv(rng, b, t, g, qh, h, s, dtype):
  q = jnp.asarray(rng.normal(size=(b, t, g, qh, h)), dtype)
  k = jnp.asarray(rng.normal(size=(b, g, s, h)), dtype)
  v = jnp.asarray(rng.normal(size=(b, g, s, h)), dtype)
  return q, k, v


def _mask(rng, kind, b, t, s):
  """[B, T, S] masks of the shapes the model builds."""
  rows = np.arange(s)
  query_rows = s - t + np.arange(t)  # the queries are the last T rows
  causal = rows[None, :] <= query_rows[:, None]
  if kind == "random":
    return rng.random((b, t, s)) > 0.3
  if kind == "merged":  # branch rows all visible, then the synthesizer's own causal tokens,
    filled = s - t - 40  # with unwritten capacity between them
    valid = (rows < filled) | (rows >= s - t)
    valid = np.broadcast_to(valid, (b, s)).copy()
    valid[-1, 5:9] = False  # a shorter branch's padding
    return valid[:, None, :] & causal[None]
  if kind == "window":
    return np.broadcast_to(causal & (query_rows[:, None] - rows[None, :] < 23), (b, t, s))
  if kind == "padded":  # left-padded prompts: the first rows of example 0 are padding
    valid = np.ones((b, s), bool)
    valid[0, : s // 3] = False
    return valid[:, None, :] & causal[None]
  raise ValueError(kind)


CASES = [  # (kind, T, G, Q, S): GQA ratios 1-4, S not a multiple of the block, decode
  ("random", 37, 2, 3, 300),
  ("merged", 24, 2, 2, 333),
  ("window", 50, 1, 4, 260),
  ("padded", 64, 2, 1, 200),
  ("merged", 1, 2, 2, 290),
  ("window", 150, 2, 2, 260),  # more queries than a block: query chunks
  ("padded", 130, 1, 3, 200),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind,t,g,qh,s", CASES)
def test_blocked_equals_dense(kind, t, g, qh, s, dtype):
  rng = np.random.default_rng(hash((kind, t, s)) % 2**32)
  q, k, v = _qkv(rng, 2, t, g, qh, 16, s, dtype)
  mask = jnp.asarray(_mask(rng, kind, 2, t, s))
  seen = np.asarray(mask.any(-1))  # queries with no key at all (padding) are never read
  want = np.asarray(dense_attention(q, k, v, mask), np.float32)
  got = np.asarray(blocked_attention(q, k, v, mask, block=64), np.float32)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(got[seen], want[seen], atol=tol, rtol=0)


def test_a_score_bias_is_added_to_every_query_of_its_key():
  """bias [B, S]: blocked == dense == a plain float64 softmax with the bias added."""
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng, 2, 9, 2, 2, 16, 150, jnp.float32)
  mask = jnp.asarray(_mask(rng, "merged", 2, 9, 150))
  bias = jnp.asarray(rng.normal(size=(2, 150)), jnp.float32)
  dense = np.asarray(dense_attention(q, k, v, mask, bias=bias))
  blocked = np.asarray(blocked_attention(q, k, v, mask, block=64, bias=bias))
  q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
  scores = np.einsum("btgqh,bgsh->btgqs", q64, k64) / 4.0 + np.asarray(bias)[:, None, None, None]
  scores = np.where(np.asarray(mask)[:, :, None, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  want = np.einsum("btgqs,bgsh->btgqh", probs / probs.sum(-1, keepdims=True), v64)
  np.testing.assert_allclose(dense, want, atol=1e-5)
  np.testing.assert_allclose(blocked, want, atol=1e-5)
  with pytest.raises(ValueError, match="score bias"):
    attention(q, k, v, mask, "cudnn", bias=bias)


@pytest.mark.parametrize("kind,t", [("merged", 20), ("window", 20), ("window", 100)])
def test_blocked_gradients_equal_dense(kind, t):
  rng = np.random.default_rng(3)
  s = 150
  q, k, v = _qkv(rng, 2, t, 2, 2, 8, s, jnp.float32)
  mask = jnp.asarray(_mask(rng, kind, 2, t, s))
  weight = jnp.asarray(rng.normal(size=q.shape)) * mask.any(-1)[:, :, None, None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * weight)

  want = jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
  blocked = lambda q, k, v, m: blocked_attention(q, k, v, m, block=32)  # noqa: E731
  got = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_blocked_backward_keeps_no_score_matrix():
  rng = np.random.default_rng(4)
  t, s, qh = 256, 1024, 2
  q, k, v = _qkv(rng, 1, t, 1, qh, 8, s, jnp.float32)
  mask = jnp.asarray(_mask(rng, "merged", 1, t, s))
  scores = qh * t * s * 4  # one float32 [Q*T, S] matrix
  dense = residuals(lambda q, k, v: jnp.sum(dense_attention(q, k, v, mask)), q, k, v)
  blocked = residuals(lambda q, k, v: jnp.sum(blocked_attention(q, k, v, mask)), q, k, v)
  assert max(nbytes(x) for x in dense) >= scores
  assert sum(nbytes(x) for x in blocked) < scores / 4


def test_blocks_no_query_sees_are_skipped():
  """A key block no query sees takes no part: NaN keys there change nothing."""
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng, 1, 8, 1, 2, 8, 256, jnp.float32)
  mask = np.zeros((1, 8, 256), bool)
  mask[:, :, :64] = True
  mask[:, :, 192:] = True
  k = k.at[:, :, 64:192].set(jnp.nan)
  v = v.at[:, :, 64:192].set(jnp.nan)
  out = blocked_attention(q, k, v, jnp.asarray(mask), block=64)
  assert np.isfinite(np.asarray(out)).all()
  keep = np.r_[0:64, 192:256]
  want = dense_attention(q, k[:, :, keep], v[:, :, keep], jnp.asarray(mask[:, :, keep]))
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6)


def test_each_query_chunk_skips_the_blocks_it_does_not_see():
  """Queries 0-63 see keys 0-63, queries 64-127 keys 64-127 (block 64): with NaN in keys
  64-127, the first chunk's outputs equal dense over keys 0-63."""
  rng = np.random.default_rng(6)
  q, k, v = _qkv(rng, 1, 128, 1, 2, 8, 128, jnp.float32)
  mask = np.zeros((1, 128, 128), bool)
  mask[:, :64, :64] = True
  mask[:, 64:, 64:] = True
  poisoned = [x.at[:, :, 64:].set(jnp.nan) for x in (k, v)]
  out = blocked_attention(q, *poisoned, jnp.asarray(mask), block=64)
  want = dense_attention(q[:, :64], k[:, :, :64], v[:, :, :64], jnp.asarray(mask[:, :64, :64]))
  np.testing.assert_allclose(np.asarray(out[:, :64]), np.asarray(want), atol=1e-6)


def test_auto_and_refusals():
  assert attention_ops.resolve("auto", (1, 1, 2, 7, 64), 4096, jnp.float32) == "dense"  # decode
  assert attention_ops.resolve("auto", (1, 1024, 2, 7, 64), 4096, jnp.float32) == "blocked"
  q = jnp.zeros((1, 2, 1, 1, 8))
  k = jnp.zeros((1, 1, 4, 8))
  mask = jnp.ones((1, 2, 4), bool)
  with pytest.raises(NotImplementedError, match="Pallas"):
    attention(q, k, k, mask, "splash")
  with pytest.raises(ValueError, match="one of"):
    attention(q, k, k, mask, "flashy")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs a GPU"):
      attention(q, k, k, mask, "cudnn")


def test_the_model_gives_the_same_tokens_with_either_implementation():
  config = tiny_config(num_layers=2, vocab_size=64, max_position_embeddings=512)
  lm = LanguageModel(random_params(config, seed=2), stop_ids=())
  prompts = [list(range(1, 40)), list(range(5, 20))]
  dense, blocked = lm.with_attention("dense"), lm.with_attention("blocked")
  tokens = jnp.asarray([list(range(1, 60))])
  np.testing.assert_allclose(
    np.asarray(blocked.logits(tokens)), np.asarray(dense.logits(tokens)), atol=1e-5, rtol=0
  )
  assert blocked.generate(prompts, 12) == dense.generate(prompts, 12)
  with pytest.raises(ValueError, match="one of"):
    lm.with_attention("fast")


@pytest.mark.parametrize("impl", ["dense", "blocked"])
@pytest.mark.parametrize("filled", [0, 1, 130, 255, 256, 257, 700, 1000])
def test_over_a_cache_only_the_visible_prefix_is_read(impl, filled):
  """Queries over a 1,000-row cache whose last visible key is row `filled` - 1: attention
  equals the implementation over all rows, and keys past the prefix it picks are not read
  (NaN there changes nothing)."""
  rng = np.random.default_rng(filled)
  s, t = 1000, 3
  q, k, v = _qkv(rng, 2, t, 2, 2, 8, s, jnp.float32)
  mask = np.broadcast_to(np.arange(s) < filled, (2, t, s)).copy()
  mask[0, 1, : filled // 2] = False  # rows differ per query and example
  mask[1, :, 3:9] = False
  bias = jnp.asarray(rng.normal(size=(2, s)), jnp.float32)
  mask = jnp.asarray(mask)
  fn = dense_attention if impl == "dense" else blocked_attention
  want = np.asarray(fn(q, k, v, mask, bias=bias))
  got = np.asarray(jax.jit(attention, static_argnums=4)(q, k, v, mask, impl, None, None, bias))
  seen = np.asarray(mask.any(-1))
  np.testing.assert_allclose(got[seen], want[seen], atol=2e-6, rtol=0)
  sizes = attention_ops.prefix_sizes(t, s)
  read = next((n for n in sizes if n >= filled), s)
  poisoned = attention(
    q, k.at[:, :, read:].set(jnp.nan), v.at[:, :, read:].set(jnp.nan), mask, impl
  )
  assert read == s or np.isfinite(np.asarray(poisoned)).all()


def test_prefix_sizes():
  assert attention_ops.prefix_sizes(1, 1024) == tuple(range(128, 1025, 128))
  assert attention_ops.prefix_sizes(1, 5000)[-1] == 5000
  assert len(attention_ops.prefix_sizes(1, 5000)) <= attention_ops.PREFIXES
  assert attention_ops.prefix_sizes(1, 100) == (100,)  # short: read whole
  assert attention_ops.prefix_sizes(64, 64) == (64,)  # no cache (training): one program


def test_prefix_gradients_equal_the_full_read():
  rng = np.random.default_rng(9)
  q, k, v = _qkv(rng, 1, 2, 1, 2, 8, 600, jnp.float32)
  mask = jnp.asarray(np.broadcast_to(np.arange(600) < 300, (1, 2, 600)))

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, mask) ** 2)

  want = jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(lambda *a: attention(*a, "dense")), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("form", ["broadcast", "matmul"])
@pytest.mark.parametrize("g", [1, 2])
def test_each_decode_form_equals_float64(form, g, dtype, monkeypatch):
  """One query per row, each of dense's two forms (broadcast products at large batches,
  batched matmuls below): a float64 softmax with soft-cap and bias, and blocked, agree."""
  b = attention_ops.DECODE_REDUCE_MIN_BATCH + 1 if form == "broadcast" else 3
  if form != "broadcast":
    monkeypatch.setattr(attention_ops, "DECODE_REDUCE_MIN_BATCH", 1 << 30)
  rng = np.random.default_rng(11 + g)
  q, k, v = _qkv(rng, b, 1, g, 3, 16, 200, dtype)
  mask = jnp.asarray(_mask(rng, "merged", b, 1, 200))
  bias = jnp.asarray(rng.normal(size=(b, 200)), jnp.float32)
  got = np.asarray(dense_attention(q, k, v, mask, softcap=3.0, bias=bias), np.float32)
  want = _float64(q, k, v, mask, 3.0, bias)
  tol = 2e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want, atol=tol, rtol=0)
  blocked = blocked_attention(q, k, v, mask, block=64, softcap=3.0, bias=bias)
  np.testing.assert_allclose(np.asarray(blocked, np.float32), want, atol=max(tol, 1e-5), rtol=0)


def _float64(q, k, v, mask, softcap, bias):
  """Soft-capped, biased softmax attention in float64 (q [B, T, G, Q, H], k/v [B, G, S, H])."""
  q64, k64, v64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in (q, k, v))
  h = q64.shape[-1]
  scores = softcap * np.tanh(np.einsum("btgqh,bgsh->btgqs", q64, k64) * h**-0.5 / softcap)
  scores = np.where(
    np.asarray(mask)[:, :, None, None], scores + np.asarray(bias)[:, None, None, None], -np.inf
  )
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return np.einsum("btgqs,bgsh->btgqh", probs / probs.sum(-1, keepdims=True), v64)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
  "s,filled", [(1000, 1), (1000, 511), (1000, 700), (1000, 1000), (2048, 513), (2048, 1024)]
)
def test_decode_over_a_cache_reads_only_its_key_blocks(s, filled, dtype):
  """One query per sequence over a cache (what `attention` runs at T = 1: `decode_attention`)
  equals a float64 softmax with soft-cap and bias, with per-sequence lengths and holes, the
  block size dividing the rows or not; blocks past the last visible key are not read (NaN
  there changes nothing)."""
  rng = np.random.default_rng(filled)
  b, g, qh, c = 3, 2, 3, 512
  q, k, v = _qkv(rng, b, 1, g, qh, 16, s, dtype)
  mask = np.broadcast_to(np.arange(s) < filled, (b, 1, s)).copy()
  mask[1, :, max(1, filled // 2) :] = False  # a shorter sequence
  mask[2, :, : filled // 3] = False  # a sequence whose first rows are padding
  mask, bias = jnp.asarray(mask), jnp.asarray(rng.normal(size=(b, s)), jnp.float32)
  run = jax.jit(attention, static_argnums=4)
  got = np.asarray(run(q, k, v, mask, "auto", None, 3.0, bias), np.float32)
  want = _float64(q, k, v, mask, 3.0, bias)
  tol = 2e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got, want, atol=tol, rtol=0)
  read = -(-filled // c) * c
  if read <= s - c or s % c == 0:  # else the last block starts c rows before the end
    poison = jnp.nan
    k, v = k.at[:, :, read:].set(poison), v.at[:, :, read:].set(poison)
    poisoned = np.asarray(run(q, k, v, mask, "auto", None, 3.0, bias), np.float32)
    np.testing.assert_array_equal(poisoned, got)
