"""Per-layer rematerialisation: no value changes, and the backward pass keeps what the policy says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax.kv_cache import KVCache
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.remat import POLICIES, remat_layer, saved_bytes
from psynth_jax.model.transformer import hidden_states
from psynth_jax.testing import random_params, tiny_config
from psynth_jax.train import step as step_lib

CONFIG = tiny_config(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, vocab_size=48)
B, T = 2, 16


def _inputs(rows: int, seed: int = 0):
  """A merged-cache stand-in (random k/v in `rows` rows, then room for T tokens) and tokens."""
  rng = np.random.default_rng(seed)
  cache = KVCache.empty(CONFIG, B, rows + T)
  cache = cache.replace(
    k=tuple(jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in cache.k),
    v=tuple(jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in cache.v),
    valid=jnp.ones_like(cache.valid).at[:, rows:].set(False).at[1, rows - 3 : rows].set(False),
    index=jnp.asarray(rows, jnp.int32),
  )
  tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)))
  positions = jnp.broadcast_to(jnp.arange(T) + rows, (B, T))
  return cache, tokens, positions


@pytest.fixture(scope="module")
def model():
  params = random_params(CONFIG, seed=0)
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=4), seed=1)
  return params, jax.tree.map(lambda x: x + 0.05, lora)  # nonzero B: the adapter matters


def _loss(params, cache, tokens, positions, policy):
  """A synthesizer-like loss, differentiable in the adapter and the merged cache (the mapper's
  output), the two things training differentiates through."""

  def loss(lora, kv):
    x, _ = hidden_states(
      params, tokens, positions, cache.replace(k=kv[0], v=kv[1]), None, lora, None, policy
    )
    return jnp.sum(jnp.sin(x))

  return loss


@pytest.mark.parametrize("policy", sorted(set(POLICIES) - {"none"}))
def test_remat_changes_no_value_or_gradient(model, policy):
  params, lora = model
  cache, tokens, positions = _inputs(rows=24)
  results = {}
  for p in ("none", policy):
    fn = jax.jit(jax.value_and_grad(_loss(params, cache, tokens, positions, p), argnums=(0, 1)))
    results[p] = fn(lora, (cache.k, cache.v))
  (ref_loss, ref_grads), (loss, grads) = results["none"], results[policy]
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
    # Recomputation fuses differently: float32 rounding, relative to the gradient's scale.
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6 * scale, rtol=0)


def test_full_remat_keeps_only_the_layer_inputs(model):
  """Without remat the backward keeps every layer's attention over all cache rows, so its
  memory grows with the rows; "full" keeps each layer's input [B, T, D] and the key mask,
  and "dots_no_batch" adds the projections: neither keeps anything row-sized per layer."""
  params, lora = model
  saved = {}
  for rows in (64, 128):
    cache, tokens, positions = _inputs(rows)
    for policy in POLICIES:
      fn = _loss(params, cache, tokens, positions, policy)
      saved[policy, rows] = saved_bytes(fn, lora, (cache.k, cache.v))
  extra_rows = 128 - 64
  # float32 attention probabilities for the extra rows, one per layer: kept without remat.
  probs = CONFIG.num_layers * B * CONFIG.num_heads * T * extra_rows * 4
  assert saved["none", 128] - saved["none", 64] >= probs
  mask = B * T * extra_rows  # the [B, T, S] bool key mask, shared by the layers
  for policy in ("full", "dots_no_batch"):
    assert saved[policy, 128] - saved[policy, 64] <= mask, policy
  # Each layer's input plus the final norm's input and the loss's own cos(x): [B, T, D] each;
  # the key mask; the adapter's per-layer slices (their own arrays after slicing).
  activations = (CONFIG.num_layers + 2) * B * T * CONFIG.hidden_size * 4
  adapter = sum(x.nbytes for x in jax.tree.leaves(lora))
  assert saved["full", 128] <= activations + B * T * (128 + T) + adapter + 1024
  assert saved["full", 128] < saved["dots_no_batch", 128] < saved["dots", 128]
  assert saved["dots", 128] < saved["none", 128]


def test_unknown_policies_are_refused():
  with pytest.raises(ValueError, match="remat policy"):
    remat_layer(lambda x: x, "everything")
  with pytest.raises(ValueError, match="remat policy"):
    step_lib.StepConfig(branch_rows=8, remat="offload")


def test_saved_bytes_counts_new_residuals_once_and_no_inputs():
  x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
  assert saved_bytes(lambda x: jnp.sum(x * 3.0), x) == 0  # linear: nothing kept
  assert saved_bytes(lambda x: jnp.sum(x * x), x) == 0  # keeps x itself, an input
  # sin keeps cos(x) [8, 16]; exp(y) keeps its own output, once though used twice.
  assert saved_bytes(lambda x: jnp.sum(jnp.sin(x)), x) == 8 * 16 * 4
  y = jax.ShapeDtypeStruct((4,), jnp.float32)
  assert saved_bytes(lambda y: jnp.sum(jnp.exp(y) + jnp.exp(y)), y) <= 2 * 4 * 4
