"""Gemma 3 (and Gemma 2): parity with transformers, and reading their configs.

* Logits equal transformers' (max |dlogit| <= 1e-4, float32) on tiny random models with
  local and global layers, a window shorter than the sequences, two RoPE bases (the
  global one linearly scaled), query_pre_attn_scalar != head_dim, soft-capping (Gemma 2,
  Gemma 3's final cap), left padding, and the text part of a multimodal `gemma3` folder;
  greedy generation equals transformers' for 32 tokens on prompts of different lengths.
* Each feature is exercised: dropping any one of them changes the logits.
* Config reading: v4 and v5 schemas agree, the layer pattern matches transformers', a
  converted folder round-trips, and what we do not implement is refused by name.

The method's invariants on the same model are in test_gemma3_invariants.py.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax.language_model import LanguageModel
from psynth_jax.model.attention_ops import blocked_attention, dense_attention
from psynth_jax.model.checkpoint import load_converted, save_converted
from psynth_jax.model.config import ModelConfig, RopeScaling, UnsupportedModelError
from psynth_jax.model.transformer import forward
from psynth_jax.testing import GEMMA3_TINY, hf_model, random_params, tiny_gemma3_config

TOL = 1e-4
WINDOW = GEMMA3_TINY["sliding_window"]
LOCAL, GLOBAL = "sliding_attention", "full_attention"
CONFIG = tiny_gemma3_config()
# name -> (transformers config class name, kwargs over GEMMA3_TINY)
CASES = {
  "gemma3": ("Gemma3TextConfig", {}),
  "gemma3_mqa_untied_capped": (
    "Gemma3TextConfig",
    dict(num_key_value_heads=1, tie_word_embeddings=False, final_logit_softcapping=2.0),
  ),
  "gemma2_capped": (
    "Gemma2Config",
    dict(
      model_type="gemma2",
      attn_logit_softcapping=1.5,
      final_logit_softcapping=2.0,
      rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    ),
  ),
}


def hf_case(name: str, seed: int = 0):
  transformers = pytest.importorskip("transformers")
  cls_name, changes = CASES[name]
  kwargs = {k: v for k, v in {**GEMMA3_TINY, **changes}.items() if k != "model_type"}
  return hf_model(getattr(transformers, cls_name), seed, **kwargs)


def hf_logits(model, tokens, attention_mask=None, position_ids=None) -> np.ndarray:
  import torch

  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(tokens),
      attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
      position_ids=None if position_ids is None else torch.tensor(position_ids),
    )
  return out.logits.float().numpy()


_forward = jax.jit(forward)


def our_logits(params, tokens, mask=None, positions=None) -> np.ndarray:
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(_forward(params, jnp.asarray(tokens), jnp.asarray(positions), None, mask)[0])


def tokens_of(shape, seed=1):
  return np.random.default_rng(seed).integers(0, GEMMA3_TINY["vocab_size"], shape).astype(np.int32)


def load_case(name, tmp_path):
  from psynth_jax.convert.hf import load_hf_folder

  model = hf_case(name)
  model.save_pretrained(tmp_path)
  return model, load_hf_folder(tmp_path)


# --- parity with transformers --------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_hf_parity(name, tmp_path):
  model, params = load_case(name, tmp_path)
  assert params.config.model_type == model.config.model_type
  assert params.config.layer_types == (LOCAL, GLOBAL, LOCAL, LOCAL)
  tokens = tokens_of((2, 17))  # 17 > 3 windows
  delta = np.abs(our_logits(params, tokens) - hf_logits(model, tokens)).max()
  assert delta <= TOL, f"{name}: max |dlogit| = {delta}"


def test_hf_parity_left_padding(tmp_path):
  model, params = load_case("gemma3", tmp_path)
  tokens = tokens_of((3, 14), seed=2)
  mask = np.ones((3, 14), bool)
  mask[1, :3] = False
  mask[2, :8] = False
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ours = our_logits(params, tokens, jnp.asarray(mask), positions)
  theirs = hf_logits(model, tokens, mask.astype(np.int64), positions)
  assert np.abs(ours - theirs)[mask].max() <= TOL


def test_multimodal_gemma3_folder_loads_its_text_part(tmp_path):
  transformers = pytest.importorskip("transformers")
  from psynth_jax.convert.hf import load_hf_folder

  text = {k: v for k, v in GEMMA3_TINY.items() if k != "model_type"}
  vision = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
  )
  config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
  model = hf_model(lambda **kw: config, seed=3)
  model.save_pretrained(tmp_path)  # language_model.model.*, vision_tower.*, projector
  params = load_hf_folder(tmp_path)
  assert params.config == CONFIG
  tokens = tokens_of((2, 13), seed=4)
  assert np.abs(our_logits(params, tokens) - hf_logits(model, tokens)).max() <= TOL


def test_greedy_generation_equals_transformers(tmp_path):
  import torch

  model, params = load_case("gemma3", tmp_path)
  lm = LanguageModel(params, stop_ids=(), pad_id=0)
  prompts = [tokens_of((n,), seed=n).tolist() for n in (3, 9, 14)]
  ours = lm.generate(prompts, 32)  # one batch, left-padded
  for prompt, got in zip(prompts, ours, strict=True):
    with torch.no_grad():
      want = model.generate(
        torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0
      )
    assert got == want[0, len(prompt) :].tolist()


def test_each_feature_changes_the_logits():
  """Guards for the parity tests: with any one Gemma feature off, the logits move."""
  params = random_params(CONFIG, seed=1)
  tokens = tokens_of((1, 17))
  base = our_logits(params, tokens)
  changes = dict(
    window=dict(layer_types=(GLOBAL,) * 4),
    local_base=dict(rope_local_theta=None),
    global_scaling=dict(rope_scaling=None),
    attention_scale=dict(query_pre_attn_scalar=None),
    attn_softcap=dict(attn_softcap=1.5),
    final_softcap=dict(final_softcap=2.0),
    gelu=dict(mlp_activation="silu"),
    embed_scale=dict(embed_scale=False),
  )
  for name, change in changes.items():
    other = params.replace(config=CONFIG.replace(**change))
    assert np.abs(our_logits(other, tokens) - base).max() > 100 * TOL, name


def test_blocked_attention_equals_dense_with_scale_and_softcap():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 9, 2, 2, 16)) * 3, jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 40, 2, 16)) * 3, jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 9, 40)) > 0.3)
  for scale, softcap in ((None, None), (24**-0.5, None), (0.2, 1.5)):
    want = dense_attention(q, k, v, mask, scale, softcap)
    got = blocked_attention(q, k, v, mask, block=16, scale=scale, softcap=softcap)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert np.abs(dense_attention(q, k, v, mask, 0.2) - want).max() > 1e-2  # the cap matters


# --- config reading --------------------------------------------------------------------


def test_v4_and_v5_schemas_agree():
  v4 = {k: v for k, v in GEMMA3_TINY.items() if k not in ("rope_parameters", "layer_types")}
  v4 |= dict(
    rope_theta=1e6,
    rope_scaling={"rope_type": "linear", "factor": 2.0},
    rope_local_base_freq=1e4,
    num_hidden_layers=6,
    sliding_window_pattern=3,
  )
  config = ModelConfig.from_hf(v4)
  assert config.layer_types == (LOCAL, LOCAL, GLOBAL) * 2  # HF: every 3rd layer global
  v5 = {**GEMMA3_TINY, "num_hidden_layers": 6, "layer_types": list(config.layer_types)}
  assert ModelConfig.from_hf(v5) == config
  assert (config.rope_theta, config.rope_local_theta) == (1e6, 1e4)
  assert config.rope_scaling == RopeScaling("linear", 2.0)
  assert config.window(0) == WINDOW and config.window(2) is None


def test_converted_folder_round_trip(tmp_path):
  params = random_params(CONFIG)
  save_converted(params, tmp_path)
  assert json.loads((tmp_path / "psynth_config.json").read_text())["layer_types"][1] == GLOBAL
  loaded = load_converted(tmp_path)
  assert loaded.config == CONFIG and loaded.fingerprint == params.fingerprint


@pytest.mark.parametrize(
  "change,match",
  [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="gelu"), "'gelu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(layer_types=[LOCAL, "chunked_attention", LOCAL, GLOBAL]), "chunked_attention"),
    (
      dict(rope_parameters={GLOBAL: {"rope_type": "yarn", "factor": 4.0}, LOCAL: {}}),
      "'yarn'",
    ),
    (
      dict(rope_parameters={GLOBAL: {}, LOCAL: {"rope_type": "linear", "factor": 2.0}}),
      "local .*linear",
    ),
    (dict(model_type="gemma"), "'gemma'"),
  ],
)
def test_what_is_not_implemented_is_refused_by_name(change, match):
  with pytest.raises(UnsupportedModelError, match=match):
    ModelConfig.from_hf({**GEMMA3_TINY, **change})


def test_multimodal_config_without_text_part_is_named():
  with pytest.raises(KeyError, match="text_config"):
    ModelConfig.from_hf({"model_type": "gemma3", "vision_config": {}})
