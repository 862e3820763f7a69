"""The method's invariants on Gemma 3, whose local and global layers differ.

* Cached decoding equals the uncached forward past the window.
* Re-encoding a worker's keys equals recomputing them at the new positions on every
  layer, local and global, each with its own RoPE table (the global table would be
  wrong on the local layers); single-table families re-encode exactly as before (bit
  for bit) and keep their config digests.
* One branch prefilled at shifted positions, via cache, equals the same tokens via text
  (Gemma 3, and Gemma 2 with its soft-caps);
  over a merged cache the local layers' window follows the re-encoded positions (a
  hand-built cache through the plain forward), and branch order does not matter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel
from psynth_jax.merge import mapped_branch_kv, reencode
from psynth_jax.model.config import RopeScaling
from psynth_jax.model.fingerprint import config_digest
from psynth_jax.model.rope import apply_rope, inv_frequencies, layer_inv_frequencies
from psynth_jax.model.transformer import forward
from psynth_jax.synthesis import synthesis_logits, synthesize, synthesize_text
from psynth_jax.testing import GEMMA3_TINY, random_params, tiny_config, tiny_gemma3_config
from psynth_jax.workers import Branches, encode_branches

TOL = 1e-4
WINDOW = GEMMA3_TINY["sliding_window"]
LOCAL, GLOBAL = "sliding_attention", "full_attention"
CONFIG = tiny_gemma3_config()

_forward = jax.jit(forward)


def our_logits(params, tokens) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(_forward(params, jnp.asarray(tokens), jnp.asarray(positions))[0])


def tokens_of(shape, seed=1):
  return np.random.default_rng(seed).integers(0, GEMMA3_TINY["vocab_size"], shape).astype(np.int32)


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(random_params(CONFIG, seed=2), stop_ids=(), pad_id=0)


def test_cached_decode_equals_uncached_forward(lm):
  tokens = tokens_of((2, 14), seed=5)
  positions = np.broadcast_to(np.arange(14, dtype=np.int32), (2, 14))
  full = our_logits(lm.params, tokens)
  cache = KVCache.empty(CONFIG, 2, 16)
  steps = []
  for t in range(14):
    logits, cache = _forward(lm.params, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=TOL, rtol=TOL)


@jax.jit
def _prefill(params, tokens, positions):
  cache = KVCache.empty(params.config, tokens.shape[0], tokens.shape[1])
  return forward(params, tokens, positions, cache)[1]


def test_reencode_equals_recomputing_keys_on_every_layer_type():
  """Worker outputs at positions 6.. (branch 0) and 506.. (branch 1) land at 0..n-1."""
  params = random_params(CONFIG, seed=3)
  w, n, rows = 6, 9, 24
  tokens = np.pad(tokens_of((2, w + n), seed=6), ((0, 0), (0, rows - w - n)))
  starts = np.array([0, 500])
  worker = _prefill(params, tokens, starts[:, None] + np.arange(rows))
  keep = slice(w, w + n)
  branches = Branches(
    cache=KVCache(
      k=tuple(kl[:, :, keep] for kl in worker.k),
      v=tuple(vl[:, :, keep] for vl in worker.v),
      positions=worker.positions[:, keep],
      valid=jnp.ones((2, n), bool),
      index=jnp.asarray(n, jnp.int32),
    ),
    lengths=jnp.asarray([n, n], jnp.int32),
    offsets=jnp.asarray(starts + w, jnp.int32),
    tokens=jnp.asarray(tokens[:, keep]),
  )
  k, v = mapped_branch_kv(branches, CONFIG, None)
  recomputed = _prefill(params, tokens, np.broadcast_to(np.arange(rows) - w, (2, rows)))
  for layer in range(CONFIG.num_layers):
    want = np.asarray(recomputed.k[layer][:, :, keep])
    np.testing.assert_allclose(k[layer], want, atol=2e-4, err_msg=f"layer {layer}")
    np.testing.assert_array_equal(v[layer], worker.v[layer][:, :, keep])
    if CONFIG.is_sliding(layer):  # the global table is the wrong one here
      wrong = reencode(branches.cache.k[layer], branches.offsets, CONFIG)
      assert np.abs(np.asarray(wrong) - want).max() > 0.1


@pytest.mark.parametrize("name", ["llama", "mistral_window", "qwen3_llama3"])
def test_single_table_families_reencode_exactly_as_before(name):
  config = {
    "llama": tiny_config(),
    "mistral_window": tiny_config(model_type="mistral", sliding_window=4),
    "qwen3_llama3": tiny_config(
      model_type="qwen3", qk_norm=True, rope_scaling=RopeScaling("llama3", 4.0, 1.0, 4.0, 16)
    ),
  }[name]
  tables = layer_inv_frequencies(config)
  assert all(np.array_equal(t, inv_frequencies(config)) for t in tables)
  rng = np.random.default_rng(0)
  k = tuple(jnp.asarray(rng.normal(size=(2, 2, 7, 8)), jnp.float32) for _ in range(2))
  offsets = jnp.asarray([3, 200], jnp.int32)
  cache = KVCache(k, k, jnp.zeros((2, 7), jnp.int32), jnp.ones((2, 7), bool), jnp.asarray(7))
  branches = Branches(cache, jnp.asarray([7, 7]), offsets, jnp.zeros((2, 7), jnp.int32))
  got, _ = mapped_branch_kv(branches, config, None)
  shift = jnp.broadcast_to(-offsets[:, None], (2, 7))
  for layer in range(2):  # the formula of the one-table merge, bit for bit
    rows_first = k[layer].transpose(0, 2, 1, 3)  # [K, S, G, H], as apply_rope reads it
    want = apply_rope(rows_first, shift, inv_frequencies(config)).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(got[layer], want)


def test_earlier_config_digests_are_unchanged():
  """Fingerprints recorded before the Gemma fields existed (eval run.json files) still match."""
  from psynth_jax.configs import qwen3_14b

  assert config_digest(tiny_config()) == "ea5535be"
  assert config_digest(qwen3_14b.model_config()) == "ffb76b44"
  assert config_digest(CONFIG) != config_digest(CONFIG.replace(rope_local_theta=None))


# --- synthesis over re-encoded branches ---------------------------------------------

PROMPT = [30, 31, 2, 17, 44, 6]
TEXTS = [[4, 8, 15, 16, 23], [42, 1, 2, 3, 5, 8, 13, 21, 34, 55, 7, 7], [9, 60, 11]]


# Gemma 2 on the same shapes: one RoPE table, soft-capped scores and logits, no q/k norm.
GEMMA2 = CONFIG.replace(
  model_type="gemma2", qk_norm=False, rope_local_theta=None, attn_softcap=1.5, final_softcap=2.0
)


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_one_shifted_branch_via_cache_equals_the_same_tokens_via_text(lm, family):
  """A branch prefilled alone at positions 300..311 (window 5), re-encoded to 0..11 and
  read by the synthesizer == its tokens followed by the prompt, as text from position 0
  (attention sees relative positions only, so the shift is all re-encoding must undo)."""
  if family == "gemma2":
    lm = LanguageModel(random_params(GEMMA2, seed=4), stop_ids=(), pad_id=0)
  text = TEXTS[1]
  n = len(text)
  positions = 300 + np.arange(n, dtype=np.int32)[None]
  cache = _prefill(lm.params, jnp.asarray([text], jnp.int32), positions)
  branch = Branches(
    cache,
    jnp.asarray([n], jnp.int32),
    jnp.asarray([300], jnp.int32),
    jnp.asarray([text], jnp.int32),
    lm.params.fingerprint,
  )
  got = np.asarray(synthesis_logits(lm, branch, PROMPT))
  want = np.asarray(lm.logits([text + PROMPT]))[0, n:]
  np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
  via_cache = synthesize(lm, branch, PROMPT, max_new_tokens=8)
  assert via_cache.tokens == synthesize_text(lm, text + PROMPT, max_new_tokens=8).tokens


def test_windows_over_a_merged_cache_follow_the_reencoded_positions(lm):
  """K branches == a hand-built cache (rows at positions 0..L_i-1, prompt from max L_i)
  through the plain forward, whose local layers mask keys by those positions."""
  branches = encode_branches(lm, TEXTS)
  rows = [(i, r) for i, t in enumerate(TEXTS) for r in range(len(t))]
  total, t = len(rows), len(PROMPT)

  def pad(x):  # room for the prompt, then a batch axis of 1
    return jnp.pad(x, ((0, t),) + ((0, 0),) * (x.ndim - 1))[None]

  def pack(x):  # [K, S] -> the valid rows, branch after branch
    return pad(jnp.stack([x[i, r] for i, r in rows]))

  def pack_kv(x):  # [K, G, S, H] -> [1, G, rows, H]
    return pad(jnp.stack([x[i, :, r] for i, r in rows])).transpose(0, 2, 1, 3)

  cache = KVCache(
    k=tuple(pack_kv(kl) for kl in branches.cache.k),
    v=tuple(pack_kv(vl) for vl in branches.cache.v),
    positions=pad(jnp.asarray([r for _, r in rows], jnp.int32)),
    valid=pad(jnp.ones((total,), bool)),
    index=jnp.asarray(total, jnp.int32),
  )
  positions = (12 + np.arange(t, dtype=np.int32))[None]
  want, _ = _forward(lm.params, jnp.asarray([PROMPT]), positions, cache)
  got = np.asarray(synthesis_logits(lm, branches, PROMPT))
  np.testing.assert_allclose(got, np.asarray(want[0]), atol=TOL, rtol=TOL)
  # The window is in play: rows further back than it (by position) change nothing...
  unwindowed = lm.params.replace(config=CONFIG.replace(layer_types=(GLOBAL,) * 4))
  other, _ = _forward(unwindowed, jnp.asarray([PROMPT]), positions, cache)
  assert np.abs(np.asarray(other[0]) - got).max() > 100 * TOL
  # ...and branch order does not matter.
  order = [2, 0, 1]
  shuffled = encode_branches(lm, [TEXTS[i] for i in order])
  again = np.asarray(synthesis_logits(lm, shuffled, PROMPT))
  np.testing.assert_allclose(again, got, atol=TOL, rtol=TOL)
