"""Re-encoding, cache mappers and merge.

* Re-encoding by -offset equals recomputing the keys at the new positions, for
  every RoPE variant (default, linear, Llama-3) and with qkv bias / q/k norm.
* Feature modes change only their features.
* Mappers start as the identity, ignore padding rows and branch order.

No torch here: the PyTorch reference mapper and the reference release's state
dict are tested in test_reference_mapper.py, which reuses these helpers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax.kv_cache import KVCache
from psynth_jax.mapper import FEATURE_MODES, Mapper, kinds, register
from psynth_jax.merge import mapped_branch_kv, merge
from psynth_jax.model.config import ModelConfig, RopeScaling
from psynth_jax.model.rope import apply_rope, inv_frequencies
from psynth_jax.model.transformer import forward
from psynth_jax.testing import random_params
from psynth_jax.workers import Branches

SMALL = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  max_position_embeddings=1024,
)
# Llama-3 scaling with a short original context, so that the high-, medium- and
# low-frequency regimes all occur at head_dim 8 (wavelengths 6, 63, 628, 6283).
LLAMA3 = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
ROPE_CONFIGS = {
  "default": ModelConfig("llama", **SMALL),
  "linear_qkv_bias": ModelConfig(
    "qwen2", qkv_bias=True, rope_scaling=RopeScaling("linear", 4.0), **SMALL
  ),
  "llama3_qk_norm": ModelConfig("qwen3", qk_norm=True, rope_scaling=LLAMA3, **SMALL),
}
ROWS = 24  # rows of the reference prefills


NUM_LAYERS = 3
G, H, S = 2, 8, 12


def _branches(k, v, lengths, offsets=None) -> Branches:
  """Branches from given keys/values (L x [K, S, G, H]); rows >= lengths[i] are padding."""
  lengths = jnp.asarray(lengths, jnp.int32)
  num, rows = k[0].shape[:2]
  valid = jnp.arange(rows)[None] < lengths[:, None]
  cache = KVCache(
    k=tuple(k),
    v=tuple(v),
    positions=jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32), (num, rows)),
    valid=valid,
    index=jnp.asarray(rows, jnp.int32),
  )
  offsets = jnp.zeros((num,), jnp.int32) if offsets is None else jnp.asarray(offsets, jnp.int32)
  return Branches(cache, lengths, offsets, jnp.zeros((num, rows), jnp.int32))


def random_branches(lengths, seed=0, num_layers=NUM_LAYERS) -> Branches:
  rng = np.random.default_rng(seed)
  shape = (len(lengths), S, G, H)
  k = tuple(jnp.asarray(rng.normal(0, 1.5, shape), jnp.float32) for _ in range(num_layers))
  v = tuple(jnp.asarray(rng.normal(0.3, 1.0, shape), jnp.float32) for _ in range(num_layers))
  return _branches(k, v, lengths)


# --- re-encoding ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ROPE_CONFIGS))
def test_reencode_undoes_a_rotation_exactly(name):
  config = ROPE_CONFIGS[name]
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 10, 2, 8)), jnp.float32)
  offsets = jnp.asarray([0, 7, 300], jnp.int32)
  t = jnp.broadcast_to(jnp.arange(10), (3, 10))
  inv_freq = inv_frequencies(config)
  rotated = apply_rope(x, t + offsets[:, None], inv_freq)
  branches = _branches(tuple([rotated] * 2), tuple([x] * 2), [10, 10, 10], offsets)
  k, v = mapped_branch_kv(branches, config, None)
  for layer in range(2):
    np.testing.assert_allclose(k[layer], apply_rope(x, t, inv_freq), atol=1e-4)
    np.testing.assert_array_equal(v[layer], x)  # values are untouched


@jax.jit
def _prefill(params, tokens, positions):
  cache = KVCache.empty(params.config, tokens.shape[0], tokens.shape[1])
  return forward(params, tokens, positions, cache)[1]


@pytest.mark.parametrize("name", list(ROPE_CONFIGS))
def test_reencode_equals_recomputing_keys_at_new_positions(name):
  """A worker's output rows, re-encoded, equal the same prefill at positions shifted by -offset.

  Branch 0's worker prompt starts at position 0, branch 1's at 500 (as after a long
  shared context); both outputs must land at positions 0..n-1.
  """
  config = ROPE_CONFIGS[name]
  params = random_params(config)
  rng = np.random.default_rng(1)
  w, n = 6, 9  # worker prompt and output lengths
  tokens = rng.integers(0, config.vocab_size, (2, w + n)).astype(np.int32)
  tokens = np.pad(tokens, ((0, 0), (0, ROWS - w - n)))
  starts = np.array([0, 500])
  worker = _prefill(params, tokens, starts[:, None] + np.arange(ROWS))
  rows = slice(w, w + n)
  branches = Branches(
    cache=KVCache(
      k=tuple(kl[:, rows] for kl in worker.k),
      v=tuple(vl[:, rows] for vl in worker.v),
      positions=worker.positions[:, rows],
      valid=jnp.ones((2, n), bool),
      index=jnp.asarray(n, jnp.int32),
    ),
    lengths=jnp.asarray([n, n], jnp.int32),
    offsets=jnp.asarray(starts + w, jnp.int32),
    tokens=jnp.asarray(tokens[:, rows]),
  )
  k, v = mapped_branch_kv(branches, config, None)
  recomputed = _prefill(params, tokens, np.broadcast_to(np.arange(ROWS) - w, (2, ROWS)))
  for layer in range(config.num_layers):
    np.testing.assert_allclose(k[layer], recomputed.k[layer][:, rows], atol=2e-4)
    np.testing.assert_allclose(v[layer], recomputed.v[layer][:, rows], atol=2e-4)
  # The merged cache puts both branches at positions 0..n-1, in rows 0..2n-1.
  merged = merge(branches, config, None, rows=2 * n, capacity=2 * n + 4)
  np.testing.assert_array_equal(merged.positions[0], [*range(n), *range(n), 0, 0, 0, 0])
  for layer in range(config.num_layers):
    want = np.concatenate([recomputed.k[layer][0, rows], recomputed.k[layer][1, rows]])
    np.testing.assert_allclose(merged.k[layer][0, : 2 * n], want, atol=2e-4)


# --- the paper's affine mapper ------------------------------------------------------


def random_reference_state(seed=0) -> dict[str, np.ndarray]:
  """A reference-layout state dict (torch Linear [out, in]) with a non-zero last layer."""
  rng = np.random.default_rng(seed)
  return {
    "net.0.weight": rng.normal(0, 0.8, (32, 3)).astype(np.float32),
    "net.0.bias": rng.normal(0, 0.5, (32,)).astype(np.float32),
    "net.2.weight": rng.normal(0, 1.0, (4, 32)).astype(np.float32),
    "net.2.bias": rng.normal(0, 0.5, (4,)).astype(np.float32),
  }


def mapper_with(kind: str, state: dict, num_layers=NUM_LAYERS, features="both") -> Mapper:
  """A Mapper whose fc1/fc2 hold the given torch-layout weights (transposed to [in, out])."""
  mapper = Mapper.create(kind, num_layers, features)
  ours = {
    ("fc1", "kernel"): state["net.0.weight"].T,
    ("fc1", "bias"): state["net.0.bias"],
    ("fc2", "kernel"): state["net.2.weight"].T,
    ("fc2", "bias"): state["net.2.bias"],
  }
  flat = [
    (path, var.replace(jnp.asarray(ours[tuple(path)])))
    for path, var in nnx.to_flat_state(mapper.state)
  ]
  return mapper.replace(state=nnx.from_flat_state(flat))


def _config(num_layers=NUM_LAYERS) -> ModelConfig:
  return ModelConfig("llama", **{**SMALL, "num_layers": num_layers})


def test_feature_modes_differ_only_in_their_features():
  state = random_reference_state(1)
  branches = random_branches([2, 9])
  coeffs = {
    mode: np.asarray(
      mapper_with("affine", state, features=mode).coefficients(
        branches.cache.k, branches.cache.v, branches.lengths, jnp.asarray(2)
      )
    )
    for mode in FEATURE_MODES
  }
  # 'num_workers' and 'none' ignore the length: both branches get the same coefficients.
  for mode in ("num_workers", "none"):
    np.testing.assert_allclose(coeffs[mode][0], coeffs[mode][1], atol=1e-7)
  for mode in ("both", "length"):
    assert np.abs(coeffs[mode][0] - coeffs[mode][1]).max() > 1e-4
  # Layers always differ (the layer position is always an input).
  assert np.abs(coeffs["none"][0, 0] - coeffs["none"][0, -1]).max() > 1e-4


# --- identity at init, padding and order ---------------------------------------------


@pytest.mark.parametrize("kind", ["affine", "head_affine"])
def test_mappers_start_as_the_identity(kind):
  branches = random_branches([3, 0, 12])
  mapper = Mapper.create(kind, NUM_LAYERS, seed=3)
  coeffs = np.asarray(
    mapper.coefficients(branches.cache.k, branches.cache.v, branches.lengths, jnp.asarray(3))
  )
  np.testing.assert_array_equal(coeffs, np.broadcast_to([1.0, 0.0, 1.0, 0.0], coeffs.shape))
  k, v = mapped_branch_kv(branches, _config(), mapper)
  k0, v0 = mapped_branch_kv(branches, _config(), None)
  for a, b in zip(k + v, k0 + v0, strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["affine", "head_affine"])
def test_mappers_ignore_padding_rows_and_branch_order(kind):
  lengths = [3, 0, 12, 7]
  branches = random_branches(lengths, seed=4)
  if kind == "head_affine":  # five inputs: the features and two cache statistics
    state = random_reference_state(5)
    w1 = np.random.default_rng(6).normal(0, 0.8, (32, 5)).astype(np.float32)
    state = {**state, "net.0.weight": w1}
  else:
    state = random_reference_state(5)
  mapper = mapper_with(kind, state)
  k, v = mapped_branch_kv(branches, _config(), mapper)

  # Garbage in the padding rows changes no valid row.
  junk = random_branches(lengths, seed=7)
  pad = np.arange(S)[None, :, None, None] >= np.asarray(lengths)[:, None, None, None]
  noisy = branches.replace(
    cache=branches.cache.replace(
      k=tuple(
        jnp.where(pad, 50 * j, x) for x, j in zip(branches.cache.k, junk.cache.k, strict=True)
      ),
      v=tuple(
        jnp.where(pad, 50 * j, x) for x, j in zip(branches.cache.v, junk.cache.v, strict=True)
      ),
    )
  )
  k2, v2 = mapped_branch_kv(noisy, _config(), mapper)
  for i, n in enumerate(lengths):
    for a, b in zip(k + v, k2 + v2, strict=True):
      np.testing.assert_allclose(a[i, :n], b[i, :n], rtol=1e-6, atol=1e-6)

  # Mapping permuted branches == permuting mapped branches.
  order = [2, 0, 3, 1]
  k3, v3 = mapped_branch_kv(branches.take(order), _config(), mapper)
  for new, old in enumerate(order):
    n = lengths[old]
    for a, b in zip(k + v, k3 + v3, strict=True):
      np.testing.assert_allclose(b[new, :n], a[old, :n], rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(k[0]) - np.asarray(branches.cache.k[0])).max() > 1e-2


def test_merge_packs_valid_rows_in_branch_order():
  lengths = [3, 0, 12, 7]
  branches = random_branches(lengths, seed=8)
  mapper = mapper_with("affine", random_reference_state(9))
  k, v = mapped_branch_kv(branches, _config(), mapper)
  merged = merge(branches, _config(), mapper, rows=32, capacity=40)
  total = sum(lengths)
  assert merged.batch == 1 and merged.capacity == 40 and int(merged.index) == 32
  np.testing.assert_array_equal(merged.valid[0], np.arange(40) < total)
  want_pos = np.concatenate([np.arange(n) for n in lengths])
  np.testing.assert_array_equal(merged.positions[0, :total], want_pos)
  for layer in range(NUM_LAYERS):
    want_k = np.concatenate([k[layer][i, :n] for i, n in enumerate(lengths)])
    want_v = np.concatenate([v[layer][i, :n] for i, n in enumerate(lengths)])
    np.testing.assert_array_equal(merged.k[layer][0, :total], want_k)
    np.testing.assert_array_equal(merged.v[layer][0, :total], want_v)


def test_mapper_with_another_depth_is_refused():
  branches = random_branches([3, 4])
  with pytest.raises(ValueError, match="layers"):
    mapped_branch_kv(branches, _config(), Mapper.create("affine", NUM_LAYERS + 1))
  with pytest.raises(ValueError, match="unknown mapper kind"):
    Mapper.create("mlp", NUM_LAYERS)
  with pytest.raises(ValueError, match="feature mode"):
    Mapper.create("affine", NUM_LAYERS, features="length_only")


def test_a_new_kind_is_one_registered_class():
  @register("test_scaled_values")
  class ScaledValues(nnx.Module):
    """Keys untouched, values scaled by a learned factor (0.5 here)."""

    needs_stats = False
    is_identity = False

    def __init__(self, rngs: nnx.Rngs):
      self.scale = nnx.Param(jnp.asarray(0.5))

    def coefficients(self, feats, stats):  # [K, L, 3] -> [K, L, 1, 4]
      c = jnp.stack([jnp.asarray(1.0), jnp.asarray(0.0), self.scale[...], jnp.asarray(0.0)])
      return jnp.broadcast_to(c, feats.shape[:-1] + (1, 4))

  assert "test_scaled_values" in kinds()
  mapper = Mapper.create("test_scaled_values", NUM_LAYERS)
  assert not mapper.is_identity and mapper.num_params() == 1
  branches = random_branches([3, 4])
  k0, v0 = mapped_branch_kv(branches, _config(), None)
  k1, v1 = mapped_branch_kv(branches, _config(), mapper)
  for a, b in zip(k0, k1, strict=True):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(v0, v1, strict=True):
    np.testing.assert_allclose(0.5 * np.asarray(a), b, rtol=1e-6)
  with pytest.raises(ValueError, match="already registered"):
    register("affine")(ScaledValues)
