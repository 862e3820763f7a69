"""Re-encoding, cache mappers and merge.

* Re-encoding by -offset equals recomputing the keys at the new positions, for
  every RoPE variant (default, linear, Llama-3) and with qkv bias / q/k norm.
* Feature modes keep only their features (the reference's layout: F = 3 / 2 / 2 / 1),
  `num_agents` is `num_workers`; coefficients equal the formula computed in numpy.
* The old layout (width 3 in every mode, dropped features fed zeros) loads exactly.
* A mapper without a depth fits every depth; a recorded depth is checked.
* Mappers start as the identity, ignore padding rows and branch order.

No torch here: the PyTorch reference mapper and the reference release's state
dict are tested in test_reference_mapper.py, which reuses these helpers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax.convert.reference import mapper_from_state_dict, mapper_to_state_dict
from psynth_jax.kv_cache import KVCache
from psynth_jax.mapper import (
  FEATURE_MODES,
  Mapper,
  base_features,
  cache_statistics,
  check_mapper,
  feature_names,
  kinds,
  normalize_features,
  num_features,
  register,
)
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
  """Branches from given keys/values (L x [K, G, S, H]); rows >= lengths[i] are padding."""
  lengths = jnp.asarray(lengths, jnp.int32)
  num, rows = k[0].shape[0], k[0].shape[2]
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
  shape = (len(lengths), G, S, H)
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
  rotated = apply_rope(x, t + offsets[:, None], inv_freq).transpose(0, 2, 1, 3)  # the cache's
  heads_first = x.transpose(0, 2, 1, 3)  # [K, G, S, H]
  branches = _branches(tuple([rotated] * 2), tuple([heads_first] * 2), [10, 10, 10], offsets)
  k, v = mapped_branch_kv(branches, config, None)
  for layer in range(2):
    want = apply_rope(x, t, inv_freq).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(k[layer], want, atol=1e-4)
    np.testing.assert_array_equal(v[layer], heads_first)  # values are untouched


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
      k=tuple(kl[:, :, rows] for kl in worker.k),
      v=tuple(vl[:, :, rows] for vl in worker.v),
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
    np.testing.assert_allclose(k[layer], recomputed.k[layer][:, :, rows], atol=2e-4)
    np.testing.assert_allclose(v[layer], recomputed.v[layer][:, :, rows], atol=2e-4)
  # The merged cache puts both branches at positions 0..n-1, in rows 0..2n-1.
  merged = merge(branches, config, None, rows=2 * n, capacity=2 * n + 4)
  np.testing.assert_array_equal(merged.positions[0], [*range(n), *range(n), 0, 0, 0, 0])
  for layer in range(config.num_layers):
    per_branch = [recomputed.k[layer][i, :, rows] for i in range(2)]
    want = np.concatenate(per_branch, axis=1)
    np.testing.assert_allclose(merged.k[layer][0, :, : 2 * n], want, atol=2e-4)


# --- the paper's affine mapper ------------------------------------------------------


def random_reference_state(seed=0, width=3, hidden=32) -> dict[str, np.ndarray]:
  """A reference-layout state dict (torch Linear [out, in]) with a non-zero last layer."""
  rng = np.random.default_rng(seed)
  return {
    "net.0.weight": rng.normal(0, 0.8, (hidden, width)).astype(np.float32),
    "net.0.bias": rng.normal(0, 0.5, (hidden,)).astype(np.float32),
    "net.2.weight": rng.normal(0, 1.0, (4, hidden)).astype(np.float32),
    "net.2.bias": rng.normal(0, 0.5, (4,)).astype(np.float32),
  }


def mapper_with(kind: str, state: dict, num_layers=NUM_LAYERS, features="both") -> Mapper:
  """A Mapper whose fc1/fc2 hold the given torch-layout weights (transposed to [in, out])."""
  hidden = state["net.0.weight"].shape[0]
  mapper = Mapper.create(kind, num_layers, features, hidden_dim=hidden)
  ours = {
    ("fc1", "kernel"): state["net.0.weight"].T,
    ("fc1", "bias"): state["net.0.bias"],
    ("fc2", "kernel"): state["net.2.weight"].T,
    ("fc2", "bias"): state["net.2.bias"],
  }
  flat = []
  for path, var in nnx.to_flat_state(mapper.state):
    assert var.shape == ours[tuple(path)].shape, (path, var.shape, ours[tuple(path)].shape)
    flat.append((path, var.replace(jnp.asarray(ours[tuple(path)]))))
  return mapper.replace(state=nnx.from_flat_state(flat))


def numpy_mlp_coefficients(state: dict, x: np.ndarray) -> np.ndarray:
  """Linear -> SiLU -> Linear -> (1 + 0.1 tanh, 0.1 tanh, ...) in float64: x [..., in] -> [..., 4]."""
  w0, b0 = state["net.0.weight"].astype(np.float64), state["net.0.bias"].astype(np.float64)
  w2, b2 = state["net.2.weight"].astype(np.float64), state["net.2.bias"].astype(np.float64)
  h = x @ w0.T + b0
  r = (h / (1 + np.exp(-h))) @ w2.T + b2
  return 0.1 * np.tanh(r) + np.array([1.0, 0.0, 1.0, 0.0])


def zero_fed_features(lengths, num_workers, num_layers, mode) -> np.ndarray:
  """The old layout's features [K, L, 3]: all three columns, the dropped ones zero."""
  f_len = np.log1p(np.maximum(np.asarray(lengths, np.float64), 1))
  f_num = np.full_like(f_len, np.log1p(max(num_workers, 1)))
  if mode in ("num_workers", "none"):
    f_len = 0 * f_len
  if mode in ("length", "none"):
    f_num = 0 * f_num
  f_layer = np.arange(num_layers) / max(num_layers - 1, 1)
  shape = (len(lengths), num_layers)
  return np.stack(
    [
      np.broadcast_to(f_len[:, None], shape),
      np.broadcast_to(f_num[:, None], shape),
      np.broadcast_to(f_layer[None], shape),
    ],
    -1,
  )


def _config(num_layers=NUM_LAYERS) -> ModelConfig:
  return ModelConfig("llama", **{**SMALL, "num_layers": num_layers})


def test_base_features_keep_only_their_columns_in_reference_order():
  lengths, k, layers = jnp.asarray([0, 5, 40]), jnp.asarray(3), 4
  shape = (3, layers)
  f_len = np.broadcast_to(np.log1p([1.0, 5.0, 40.0])[:, None], shape)  # max(len, 1)
  f_num = np.full(shape, np.log1p(3.0))
  f_layer = np.broadcast_to(np.arange(layers) / (layers - 1), shape)
  want = {
    "both": [f_len, f_num, f_layer],
    "length": [f_len, f_layer],
    "num_workers": [f_num, f_layer],
    "none": [f_layer],
  }
  for mode, columns in want.items():
    got = np.asarray(base_features(lengths, k, layers, mode))
    assert got.shape == (*shape, num_features(mode)) == (*shape, len(columns)), mode
    np.testing.assert_allclose(got, np.stack(columns, -1), rtol=1e-6)
  # One layer: the layer position is 0.
  np.testing.assert_array_equal(base_features(lengths, k, 1, "none"), np.zeros((3, 1, 1)))


def test_num_agents_is_an_alias_of_num_workers():
  for spelling in ("num_agents", " Num_Agents ", "NUM_WORKERS"):
    assert normalize_features(spelling) == "num_workers"
    assert Mapper.create("affine", features=spelling).features == "num_workers"
  assert normalize_features(" Both") == "both"
  with pytest.raises(ValueError, match="feature mode.*'agents'"):
    normalize_features("agents")


@pytest.mark.parametrize("hidden", [32, 16])
def test_mlp_width_follows_the_mode_and_hidden_dim(hidden):
  for mode, width in (("both", 3), ("length", 2), ("num_agents", 2), ("none", 1)):
    affine = Mapper.create("affine", NUM_LAYERS, mode, hidden_dim=hidden)
    assert affine.module().fc1.kernel.shape == (width, hidden), mode
    assert affine.num_params() == width * hidden + hidden + hidden * 4 + 4
    head = Mapper.create("head_affine", NUM_LAYERS, mode, hidden_dim=hidden)
    assert head.module().fc1.kernel.shape == (width + 2, hidden), mode  # + 2 cache statistics
  assert Mapper.create("affine", NUM_LAYERS).num_params() == 260  # the paper's count
  with pytest.raises(ValueError, match="hidden_dim"):
    Mapper.create("affine", NUM_LAYERS, hidden_dim=0)
  with pytest.raises(ValueError, match="num_layers"):
    Mapper.create("affine", 2.5)


@pytest.mark.parametrize("mode", FEATURE_MODES)
def test_affine_coefficients_match_the_formula(mode):
  state = random_reference_state(1, width=num_features(mode), hidden=16)
  lengths = [2, 0, 9]
  branches = random_branches(lengths)
  got = np.asarray(
    mapper_with("affine", state, features=mode).coefficients(
      branches.cache.k, branches.cache.v, branches.lengths, jnp.asarray(5)
    )
  )[:, :, 0]
  keep = [
    i for i, name in enumerate(("length", "num_workers", "layer")) if name in feature_names(mode)
  ]
  x = zero_fed_features(lengths, 5, NUM_LAYERS, mode)[..., keep]
  np.testing.assert_allclose(got, numpy_mlp_coefficients(state, x), rtol=1e-6, atol=1e-6)


def test_feature_modes_differ_only_in_their_features():
  branches = random_branches([2, 9])
  coeffs = {
    mode: np.asarray(
      mapper_with(
        "affine", random_reference_state(1, num_features(mode)), features=mode
      ).coefficients(branches.cache.k, branches.cache.v, branches.lengths, jnp.asarray(2))
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


@pytest.mark.parametrize("kind", ["affine", "head_affine"])
@pytest.mark.parametrize("mode", FEATURE_MODES)
def test_old_zero_fed_state_dicts_load_with_the_same_coefficients(kind, mode):
  """psynth_jax used to keep width 3 (+ 2 statistics) in every mode and feed the dropped features zeros."""
  stats = 2 if kind == "head_affine" else 0
  old = random_reference_state(2, width=3 + stats)
  mapper = mapper_from_state_dict(old, NUM_LAYERS, mode, kind=kind)
  assert mapper.module().fc1.kernel.shape == (num_features(mode) + stats, 32)
  lengths = [4, 0, 11]
  branches = random_branches(lengths, seed=3)
  got = np.asarray(
    mapper.coefficients(branches.cache.k, branches.cache.v, branches.lengths, jnp.asarray(3))
  )
  x = zero_fed_features(lengths, 3, NUM_LAYERS, mode)  # [K, L, 3]
  if stats:
    s = np.asarray(
      cache_statistics(branches.cache.k, branches.cache.v, branches.lengths), np.float64
    )
    x = np.concatenate([np.broadcast_to(x[:, :, None], s.shape[:3] + (3,)), s], -1)  # [K, L, G, 5]
  else:
    x = x[:, :, None]
  np.testing.assert_allclose(got, numpy_mlp_coefficients(old, x), rtol=1e-6, atol=1e-6)
  # Saved again, it is in the new layout and loads to the same mapper.
  again = mapper_from_state_dict(mapper_to_state_dict(mapper), NUM_LAYERS, mode, kind=kind)
  jax.tree.map(np.testing.assert_array_equal, again.state, mapper.state)


def test_a_mapper_without_a_depth_fits_every_depth():
  state = random_reference_state(4)
  mapper = mapper_with("affine", state, num_layers=None)
  for layers in (1, 2, 5):
    branches = random_branches([3, 7], seed=layers, num_layers=layers)
    coeffs = np.asarray(
      mapper.coefficients(branches.cache.k, branches.cache.v, branches.lengths, jnp.asarray(2))
    )
    assert coeffs.shape == (2, layers, 1, 4)
    want = numpy_mlp_coefficients(state, zero_fed_features([3, 7], 2, layers, "both"))
    np.testing.assert_allclose(coeffs[:, :, 0], want, rtol=1e-6, atol=1e-6)
    k, v = mapped_branch_kv(branches, _config(layers), mapper)  # the model check passes too
    for layer in range(layers):
      np.testing.assert_allclose(
        k[layer],
        coeffs[:, layer, 0, 0, None, None, None] * branches.cache.k[layer]
        + coeffs[:, layer, 0, 1, None, None, None],
        rtol=1e-6,
        atol=1e-6,
      )
  check_mapper(mapper, 7)


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
  pad = np.arange(S)[None, None, :, None] >= np.asarray(lengths)[:, None, None, None]
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
      np.testing.assert_allclose(a[i, :, :n], b[i, :, :n], rtol=1e-6, atol=1e-6)

  # Mapping permuted branches == permuting mapped branches.
  order = [2, 0, 3, 1]
  k3, v3 = mapped_branch_kv(branches.take(order), _config(), mapper)
  for new, old in enumerate(order):
    n = lengths[old]
    for a, b in zip(k + v, k3 + v3, strict=True):
      np.testing.assert_allclose(b[new, :, :n], a[old, :, :n], rtol=1e-6, atol=1e-6)
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
    want_k = np.concatenate([k[layer][i, :, :n] for i, n in enumerate(lengths)], axis=1)
    want_v = np.concatenate([v[layer][i, :, :n] for i, n in enumerate(lengths)], axis=1)
    np.testing.assert_array_equal(merged.k[layer][0, :, :total], want_k)
    np.testing.assert_array_equal(merged.v[layer][0, :, :total], want_v)


def test_mapper_with_another_depth_is_refused():
  branches = random_branches([3, 4])
  with pytest.raises(ValueError, match="layers"):
    mapped_branch_kv(branches, _config(), Mapper.create("affine", NUM_LAYERS + 1))
  recorded = Mapper.create("affine", NUM_LAYERS + 1)  # a depth that an export recorded
  with pytest.raises(
    ValueError, match=f"made for {NUM_LAYERS + 1} layers, the model has {NUM_LAYERS}"
  ):
    recorded.coefficients(branches.cache.k, branches.cache.v, branches.lengths, jnp.asarray(2))
  with pytest.raises(ValueError, match="made for 3 layers, the model has 2"):
    check_mapper(Mapper.create("head_affine", 3), 2)
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

    def __init__(self, rngs: nnx.Rngs, num_features: int, hidden_dim: int):
      self.scale = nnx.Param(jnp.asarray(0.5))

    def coefficients(self, feats, stats):  # [K, L, F] -> [K, L, 1, 4]
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
