"""Mixture of experts (Mixtral, Qwen3-MoE): parity, exact dispatch, sharding, synthesis.

* Logits equal transformers' (max |dlogit| <= 1e-4, float32) on tiny random Mixtral
  (top-2 of 8, a sliding window) and Qwen3-MoE (top-3 of 12, dense layers from
  `mlp_only_layers` and `decoder_sparse_step`, `norm_topk_prob` off and on), with
  either dispatch, from a saved folder and from transformers' fused in-memory layout;
  greedy generation equals transformers' for 32 tokens on prompts of different lengths.
* The sorted (grouped, ragged_dot) dispatch equals the dense all-experts reference
  within 1e-5, including experts that get no token, one expert taking every token, and
  a single decode token.
* Cached == uncached; one branch via cache == the same tokens via text.
* Experts sharded over an `expert` mesh axis (8 host devices) == one device.
* Dense families keep their config digests; what we do not implement is refused by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax import sharding
from psynth_jax.convert.hf import hf_state_to_flat, load_hf_folder
from psynth_jax.convert.hf_views import expert_state
from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel, load_pretrained
from psynth_jax.model.checkpoint import load_converted, save_converted
from psynth_jax.model.config import ModelConfig, UnsupportedModelError
from psynth_jax.model.fingerprint import config_digest
from psynth_jax.model.moe import dense_dispatch, route, sorted_dispatch
from psynth_jax.model.transformer import flat_state, forward, params_from_flat
from psynth_jax.synthesis import synthesis_logits, synthesize, synthesize_text
from psynth_jax.testing import (
  MIXTRAL_TINY,
  QWEN3_MOE_TINY,
  hf_model,
  random_params,
  tiny_config,
  tiny_moe_config,
)
from psynth_jax.workers import Branches

TOL = 1e-4
DISPATCH_TOL = 1e-5
VOCAB = MIXTRAL_TINY["vocab_size"]
# name -> (model_type, transformers config class, kwargs over the family's tiny config)
CASES = {
  "mixtral_window": ("mixtral", "MixtralConfig", dict(sliding_window=5)),
  "qwen3_moe_dense_layers": ("qwen3_moe", "Qwen3MoeConfig", {}),
  "qwen3_moe_all_sparse_normed": (
    "qwen3_moe",
    "Qwen3MoeConfig",
    dict(norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
  ),
}

_forward = jax.jit(forward)


def tokens_of(shape, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def our_logits(params, tokens) -> np.ndarray:
  positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(_forward(params, jnp.asarray(tokens), jnp.asarray(positions))[0])


def hf_case(name: str, seed: int = 0):
  transformers = pytest.importorskip("transformers")
  family, cls_name, changes = CASES[name]
  base = MIXTRAL_TINY if family == "mixtral" else QWEN3_MOE_TINY
  return hf_model(getattr(transformers, cls_name), seed, **{**base, **changes})


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """name -> (transformers model, our params loaded from its saved folder)."""
  out = {}
  for name in CASES:
    model = hf_case(name)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)  # per-expert tensors, as checkpoints on the hub
    out[name] = (model, load_hf_folder(folder))
  return out


def hf_logits(model, tokens) -> np.ndarray:
  import torch

  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


# --- parity with transformers ------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hf_parity_with_either_dispatch(loaded, name):
  model, params = loaded[name]
  sparse = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
  assert params.config.moe_layers == sparse  # transformers' choice of expert layers
  tokens = tokens_of((2, 17))
  want = hf_logits(model, tokens)
  for dispatch in ("sorted", "dense"):
    got = our_logits(params.replace(moe_dispatch=dispatch), tokens)
    delta = np.abs(got - want).max()
    assert delta <= TOL, f"{name} {dispatch}: max |dlogit| = {delta}"


def test_fused_in_memory_state_equals_the_saved_files(loaded):
  """transformers v5 fuses experts in memory (gate_up_proj [E, 2F, D]); its files do not."""
  for name in ("mixtral_window", "qwen3_moe_dense_layers"):
    model, params = loaded[name]
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    flat = hf_state_to_flat(params.config, state)
    want = flat_state(params)
    for key in want:
      np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(want[key]), err_msg=key)


@pytest.mark.parametrize("name", ["mixtral_window", "qwen3_moe_dense_layers"])
def test_greedy_generation_equals_transformers(loaded, name):
  import torch

  model, params = loaded[name]
  lm = LanguageModel(params, stop_ids=(), pad_id=0)
  prompts = [tokens_of((n,), seed=n).tolist() for n in (3, 9, 14)]
  ours = lm.generate(prompts, 32)  # one batch, left-padded
  for prompt, got in zip(prompts, ours, strict=True):
    with torch.no_grad():
      want = model.generate(
        torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0
      )
    assert got == want[0, len(prompt) :].tolist()


def test_router_matters():
  """Guard for the parity tests: another top-k or renormalisation moves the logits."""
  config = tiny_moe_config("qwen3_moe")
  params = random_params(config, seed=1)
  tokens = tokens_of((1, 11))
  base = our_logits(params, tokens)
  for change in (dict(norm_topk_prob=True), dict(num_experts_per_tok=2)):
    other = params.replace(config=config.replace(**change))
    assert np.abs(our_logits(other, tokens) - base).max() > 100 * TOL, change


# --- dispatch ------------------------------------------------------------------------


def _experts(rng, e, d, f):
  def w(*shape):
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[1]), jnp.float32)

  return w(e, d, f), w(e, d, f), w(e, f, d)


@pytest.mark.parametrize(
  "n,e,k,skew",
  [(37, 8, 2, None), (50, 12, 3, None), (1, 8, 2, None), (40, 8, 2, "two"), (29, 6, 1, "one")],
)
def test_sorted_dispatch_equals_dense_reference(n, e, k, skew):
  """Dropless and exact: every assignment through its own expert, whatever the routing
  (skew "two": only experts 3 and 5 get tokens; "one": expert 4 gets every token)."""
  rng = np.random.default_rng(n + e + k)
  d, f = 16, 24
  x = rng.normal(size=(n, d))
  x[:, 0] = 1.0  # a constant feature: through router row 0 it favours the same experts
  x = jnp.asarray(x, jnp.float32)
  router = rng.normal(size=(d, e))
  if skew == "two":
    router[0, [3, 5]] += 100.0
  elif skew == "one":
    router[0, 4] += 100.0
  weights, experts = route(x, jnp.asarray(router, jnp.float32), k, normalize=True)
  if skew == "two":
    assert set(np.unique(experts)) == {3, 5}
  elif skew == "one":
    assert set(np.unique(experts)) == {4}
  gate, up, down = _experts(rng, e, d, f)
  want = dense_dispatch(x, weights, experts, gate, up, down)
  got = jax.jit(sorted_dispatch)(x, weights, experts, gate, up, down)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=DISPATCH_TOL, rtol=0)
  # By hand for one token: sum_j w_j expert_j(x), the experts a token was not routed to absent.
  i = n // 2
  by_hand = sum(
    float(weights[i, j])
    * ((jax.nn.silu(x[i] @ gate[experts[i, j]]) * (x[i] @ up[experts[i, j]])) @ down[experts[i, j]])
    for j in range(k)
  )
  np.testing.assert_allclose(np.asarray(got[i]), np.asarray(by_hand), atol=DISPATCH_TOL, rtol=0)


# --- the method's invariants -------------------------------------------------------------

PROMPT = [30, 31, 2, 17, 44, 6]
TEXT = [42, 1, 2, 3, 5, 8, 13, 21, 34, 55, 7, 7]


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def lm(request):
  return LanguageModel(random_params(tiny_moe_config(request.param), seed=2), stop_ids=(), pad_id=0)


def test_cached_decode_equals_uncached_forward(lm):
  tokens = tokens_of((2, 12), seed=5)
  positions = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
  full = our_logits(lm.params, tokens)
  cache = KVCache.empty(lm.params.config, 2, 12)
  steps = []
  for t in range(12):
    logits, cache = _forward(lm.params, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
    steps.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=TOL, rtol=TOL)


@jax.jit
def _prefill(params, tokens, positions):
  cache = KVCache.empty(params.config, tokens.shape[0], tokens.shape[1])
  return forward(params, tokens, positions, cache)[1]


def test_one_shifted_branch_via_cache_equals_the_same_tokens_via_text(lm):
  """A branch prefilled alone at positions 300.., re-encoded to 0.. and read by the
  synthesizer == its tokens followed by the prompt, as text from position 0."""
  n = len(TEXT)
  positions = 300 + np.arange(n, dtype=np.int32)[None]
  cache = _prefill(lm.params, jnp.asarray([TEXT], jnp.int32), positions)
  branch = Branches(
    cache,
    jnp.asarray([n], jnp.int32),
    jnp.asarray([300], jnp.int32),
    jnp.asarray([TEXT], jnp.int32),
    lm.params.fingerprint,
  )
  got = np.asarray(synthesis_logits(lm, branch, PROMPT))
  want = np.asarray(lm.logits([TEXT + PROMPT]))[0, n:]
  np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)
  via_cache = synthesize(lm, branch, PROMPT, max_new_tokens=8)
  assert via_cache.tokens == synthesize_text(lm, TEXT + PROMPT, max_new_tokens=8).tokens


# --- sharding ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 2, 4), (1, 1, 8)])
def test_experts_sharded_over_a_mesh_axis_equal_one_device(tmp_path, shape):
  config = tiny_moe_config("mixtral")  # 8 experts: whole experts on 4 or 8 devices
  params = random_params(config, seed=3)
  save_converted(params, tmp_path)
  one = load_pretrained(tmp_path)
  mesh = sharding.make_mesh(sharding.MeshConfig(shape))
  lm = load_pretrained(tmp_path, mesh=mesh, rules=sharding.EXPERT_PARALLEL_RULES)
  for name, x in flat_state(lm.params).items():
    if ".experts." in name:  # [E, ...]: the expert axis on `tensor`, each device whole experts
      assert tuple(x.sharding.spec)[0] == "tensor", (name, x.sharding.spec)
      assert x.sharding.shard_shape(x.shape)[0] == config.num_experts // shape[2]
  tokens = np.asarray([tokens_of((9,), seed=7)])
  ref = np.asarray(one.logits(tokens))
  for dispatch in ("sorted", "dense"):
    sharded = LanguageModel(lm.params.replace(moe_dispatch=dispatch), stop_ids=(), pad_id=0)
    got = np.asarray(sharded.logits(tokens))
    np.testing.assert_allclose(got, ref, atol=DISPATCH_TOL, rtol=0, err_msg=dispatch)
  prompts = [[5, 9, 17, 3], [7, 7, 2, 40, 41, 90], [11]]
  assert lm.generate(prompts, 8) == one.generate(prompts, 8)


# --- configs ------------------------------------------------------------------------------


def test_dense_families_keep_their_digests_and_moe_fields_count():
  assert config_digest(tiny_config()) == "ea5535be"  # recorded before the MoE fields
  config = tiny_moe_config("qwen3_moe")
  assert config_digest(config) != config_digest(config.replace(norm_topk_prob=True))
  assert config_digest(config) != config_digest(config.replace(moe_layers=(1,)))


def test_converted_folder_round_trips(tmp_path):
  params = random_params(tiny_moe_config("qwen3_moe"), seed=4)
  save_converted(params, tmp_path)
  back = load_converted(tmp_path)
  assert back.config == params.config and back.fingerprint == params.fingerprint


def _hf(model_type, **changes):
  base = MIXTRAL_TINY if model_type == "mixtral" else QWEN3_MOE_TINY
  return {"model_type": model_type, **base, **changes}


@pytest.mark.parametrize(
  "hf,named",
  [
    (_hf("qwen2_moe", shared_expert_intermediate_size=32), "shared experts"),
    (_hf("deepseek_v3"), "MLA"),
    (_hf("mixtral", router_jitter_noise=0.1), "router_jitter_noise"),
    (_hf("qwen3_moe", shared_expert_intermediate_size=32), "shared experts"),
    (_hf("qwen3_moe", use_sliding_window=True), "use_sliding_window"),
  ],
)
def test_unimplemented_options_are_refused_by_name(hf, named):
  with pytest.raises(UnsupportedModelError, match=named):
    ModelConfig.from_hf(hf)


def test_missing_expert_tensor_is_named(loaded):
  model, params = loaded["mixtral_window"]
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  unfused = expert_state(params.config, state)  # the file names, one tensor per expert
  gone = "model.layers.1.block_sparse_moe.experts.6.w3.weight"
  flat = {k: unfused[k] for k in unfused if k != gone}
  with pytest.raises(KeyError, match=r"experts\.6\.w3"):
    hf_state_to_flat(params.config, flat)
  with pytest.raises(KeyError):  # and the params builder checks our names too
    params_from_flat(params.config, {})
