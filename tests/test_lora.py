"""LoRA: parity with `peft` on tiny `transformers` models, PEFT round trip, zero B == base.

Tiny random HF models (norms and biases randomised) are saved and loaded into
our params with `psynth_jax.convert.hf.load_hf_folder`; `peft` adapts them with
random non-zero A and B; our forward with the imported adapter must give the
same logits. Our own adapters, exported, must load in `peft` and give our logits.
"""

import json
import shutil

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from psynth_jax.convert.hf import load_hf_folder
from psynth_jax.convert.peft import UnsupportedAdapterError, export_peft_lora, load_peft_lora
from psynth_jax.language_model import LanguageModel
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.testing import hf_model

# torch, transformers and peft are the reference for every test here (the hf extra).
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-4
SMALL = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  max_position_embeddings=64,
)
# family -> (HF config class, extra config kwargs, peft LoraConfig kwargs)
FAMILIES = {
  "llama_gqa_hd16": (
    transformers.LlamaConfig,
    dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    dict(
      r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    ),
  ),
  "qwen2_bias_rslora_regex": (
    transformers.Qwen2Config,
    dict(num_attention_heads=4, num_key_value_heads=2),
    dict(r=2, lora_alpha=5, use_rslora=True, target_modules=r".*self_attn\.(q|v)_proj"),
  ),
  "qwen3_qk_norm": (
    transformers.Qwen3Config,
    dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    dict(r=4, lora_alpha=16, target_modules=["self_attn.q_proj", "k_proj", "v_proj", "o_proj"]),
  ),
}
EXPECTED_TARGETS = {
  "llama_gqa_hd16": ("q", "k", "v", "o"),
  "qwen2_bias_rslora_regex": ("q", "v"),
  "qwen3_qk_norm": ("q", "k", "v", "o"),
}
TOKENS = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (2, 11))


def make_hf_model(family: str, seed: int = 0):
  """A tiny random transformers model of a family, norms and biases off their init."""
  config_cls, kwargs, _ = FAMILIES[family]
  return hf_model(config_cls, seed, **SMALL, **kwargs)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """family -> (saved base folder, our LanguageModel); built lazily, once."""
  cache = {}

  def get(family):
    if family not in cache:
      folder = tmp_path_factory.mktemp(family)
      make_hf_model(family).save_pretrained(folder)
      cache[family] = (folder, LanguageModel(load_hf_folder(folder)))
    return cache[family]

  return get


def torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(TOKENS)).logits.float().numpy()


def ours(lm, lora=None) -> np.ndarray:
  return np.asarray(lm.logits(TOKENS, lora=lora))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_forward_matches_peft(family, hf_models, tmp_path):
  folder, lm = hf_models(family)
  base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  base_logits = torch_logits(base)
  model = peft.get_peft_model(base, peft.LoraConfig(**FAMILIES[family][2]))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_A" in name or "lora_B" in name:
        p.copy_(0.3 * torch.randn_like(p))  # B too: PEFT starts it at zero
  model.eval()
  want = torch_logits(model)
  model.save_pretrained(tmp_path)

  lora = load_peft_lora(tmp_path, lm.config)
  peft_cfg = FAMILIES[family][2]
  assert lora.config.rank == peft_cfg["r"]
  assert lora.config.alpha == peft_cfg["lora_alpha"]
  assert lora.config.dropout == peft_cfg.get("lora_dropout", 0.0)
  assert lora.config.use_rslora == peft_cfg.get("use_rslora", False)
  assert lora.config.targets == EXPECTED_TARGETS[family]
  got = ours(lm, lora)
  np.testing.assert_allclose(got, want, atol=TOL)
  assert np.abs(want - base_logits).max() > 1e-2  # the adapter matters


def random_lora(lm, config: LoRAConfig, seed=0) -> LoRAWeights:
  rng = np.random.default_rng(seed)
  lora = LoRAWeights.init(lm.config, config, seed=seed)
  flat = [
    (path, var.replace(rng.normal(0, 0.3, var.shape).astype(np.float32)))
    for path, var in nnx.to_flat_state(lora.state)
  ]
  return lora.replace(state=nnx.from_flat_state(flat))


def test_exported_adapter_loads_in_peft_and_round_trips(hf_models, tmp_path):
  folder, lm = hf_models("llama_gqa_hd16")
  config = LoRAConfig(rank=3, alpha=6.0, targets=("q", "v", "o"), use_rslora=True)
  lora = random_lora(lm, config)
  out = tmp_path / "adapter"
  export_peft_lora(lora, out, base_model_name_or_path=str(folder))
  saved = json.loads((out / "adapter_config.json").read_text())
  assert saved["peft_type"] == "LORA" and saved["base_model_name_or_path"] == str(folder)

  base = transformers.AutoModelForCausalLM.from_pretrained(folder)
  model = peft.PeftModel.from_pretrained(base, out).eval()
  assert model.peft_config["default"].use_rslora
  np.testing.assert_allclose(ours(lm, lora), torch_logits(model), atol=TOL)

  again = load_peft_lora(out, lm.config)
  assert again.config == lora.config
  for t in config.targets:
    for a, b in zip(again.arrays(t), lora.arrays(t), strict=True):
      np.testing.assert_array_equal(a, b)

  # PEFT's own save of the loaded adapter reads back to the same weights.
  resaved = tmp_path / "resaved"
  model.save_pretrained(resaved)
  third = load_peft_lora(resaved, lm.config)
  for t in config.targets:
    for a, b in zip(third.arrays(t), lora.arrays(t), strict=True):
      np.testing.assert_array_equal(a, b)


def test_zero_init_b_equals_the_base_model(hf_models, tmp_path):
  folder, lm = hf_models("llama_gqa_hd16")
  lora = LoRAWeights.init(lm.config)
  assert (lora.config.rank, lora.config.alpha, lora.config.dropout) == (16, 32.0, 0.0)  # paper
  assert lora.config.targets == ("q", "k", "v", "o")
  assert all(not np.asarray(lora.arrays(t)[1]).any() for t in lora.config.targets)
  assert all(np.asarray(lora.arrays(t)[0]).any() for t in lora.config.targets)
  np.testing.assert_array_equal(ours(lm, lora), ours(lm))
  # Exported, the fresh adapter is also a no-op in peft.
  export_peft_lora(lora, tmp_path)
  base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  want = torch_logits(base)
  model = peft.PeftModel.from_pretrained(base, tmp_path).eval()
  np.testing.assert_allclose(torch_logits(model), want, atol=1e-6)


# --- import errors -------------------------------------------------------------------

PREFIX = "base_model.model.model.layers"


@pytest.fixture
def adapter(hf_models, tmp_path):
  """A valid exported adapter folder (rank 3, q/k/v/o) and the model config."""
  _, lm = hf_models("llama_gqa_hd16")
  folder = tmp_path / "adapter"
  export_peft_lora(random_lora(lm, LoRAConfig(rank=3, alpha=6.0)), folder)
  return folder, lm.config


def _edit_config(folder, **changes):
  path = folder / "adapter_config.json"
  cfg = json.loads(path.read_text())
  cfg.update(changes)
  path.write_text(json.dumps(cfg))


def _edit_tensors(folder, fn):
  path = folder / "adapter_model.safetensors"
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path)


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(target_modules=["q_proj", "embed_tokens"]), r"model\.embed_tokens"),
    (dict(target_modules="all-linear"), "all-linear"),
    (
      dict(target_modules=r".*\.mlp\.(gate|up)_proj", exclude_modules=r"model\.layers\.1\..*"),
      r"gate_proj in layers \[0\] only",
    ),
    (dict(target_modules=["lm_head"]), "lm_head"),
    (dict(target_modules=r"model\.layers\.0\.self_attn\.q_proj"), r"layers \[0\] only"),
    (dict(target_modules=None), "target_modules"),
    (dict(use_dora=True), "use_dora"),
    (dict(bias="lora_only"), "bias"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(exclude_modules=["o_proj", "k_proj", "v_proj", "q_proj"]), "none of"),
    (dict(exclude_modules=r"model\.layers\.1\..*"), r"layers \[0\] only"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 2}), "alpha_pattern"),
    (dict(modules_to_save=["lm_head", "model.norm"]), r"modules_to_save.*model\.norm"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(peft_type="IA3"), "peft_type"),
  ],
  ids=lambda x: x if isinstance(x, str) else next(iter(x)),
)
def test_unsupported_adapter_options_are_refused(adapter, changes, message):
  folder, config = adapter
  _edit_config(folder, **changes)
  with pytest.raises(UnsupportedAdapterError, match=message):
    load_peft_lora(folder, config)


def test_options_that_change_nothing_are_accepted(adapter):
  folder, config = adapter
  _edit_config(folder, layers_to_transform=[0, 1], exclude_modules=["lm_head"], lora_dropout=None)
  lora = load_peft_lora(folder, config)
  assert lora.config.targets == ("q", "k", "v", "o") and lora.config.dropout == 0.0
  # Excluding v_proj keeps the other three; its tensors are then unexpected.
  _edit_config(folder, exclude_modules=["v_proj"])
  with pytest.raises(KeyError, match=r"unexpected=\[.*v_proj"):
    load_peft_lora(folder, config)
  _edit_tensors(folder, lambda t: [t.pop(n) for n in list(t) if ".v_proj." in n])
  assert load_peft_lora(folder, config).config.targets == ("q", "k", "o")


def test_bf16_and_legacy_bin_adapters_load(adapter, tmp_path):
  """Adapters trained in bf16 are saved in bf16; old PEFT versions wrote adapter_model.bin."""
  folder, config = adapter
  want = load_peft_lora(folder, config)
  tensors = {
    k: torch.from_numpy(v) for k, v in load_file(folder / "adapter_model.safetensors").items()
  }
  half = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
  safetensors_torch.save_file(half, folder / "adapter_model.safetensors")
  got = load_peft_lora(folder, config)
  for t in want.config.targets:
    for a, b in zip(got.arrays(t), want.arrays(t), strict=True):
      np.testing.assert_array_equal(a, torch.from_numpy(np.asarray(b)).bfloat16().float().numpy())
  (folder / "adapter_model.safetensors").unlink()
  torch.save(tensors, folder / "adapter_model.bin")
  got = load_peft_lora(folder, config)
  for t in want.config.targets:
    for a, b in zip(got.arrays(t), want.arrays(t), strict=True):
      np.testing.assert_array_equal(a, b)


def test_missing_unexpected_and_misshapen_tensors_are_named(adapter, tmp_path):
  folder, config = adapter
  name_a = f"{PREFIX}.1.self_attn.k_proj.lora_A.weight"

  missing = tmp_path / "missing"
  shutil.copytree(folder, missing)
  _edit_tensors(missing, lambda t: t.pop(name_a))
  with pytest.raises(KeyError, match=r"missing=\[.*layers\.1\.self_attn\.k_proj\.lora_A"):
    load_peft_lora(missing, config)

  extra = tmp_path / "extra"
  shutil.copytree(folder, extra)
  extra_name = f"{PREFIX}.0.mlp.up_proj.lora_A.weight"
  _edit_tensors(extra, lambda t: t.update({extra_name: np.zeros((3, 32), np.float32)}))
  with pytest.raises(KeyError, match=r"unexpected=\[.*mlp\.up_proj\.lora_A"):
    load_peft_lora(extra, config)

  rank = tmp_path / "rank"
  shutil.copytree(folder, rank)
  _edit_config(rank, r=4)  # the tensors have rank 3
  with pytest.raises(ValueError, match=r"lora_A\.weight.*\(3, 32\), expected \(4, 32\)"):
    load_peft_lora(rank, config)

  transposed = tmp_path / "transposed"
  shutil.copytree(folder, transposed)
  _edit_tensors(transposed, lambda t: t.update({name_a: np.ascontiguousarray(t[name_a].T)}))
  with pytest.raises(ValueError, match="k_proj.lora_A.weight"):
    load_peft_lora(transposed, config)

  with pytest.raises(KeyError, match=r"missing=\[.*layers\.2\."):
    load_peft_lora(folder, config.replace(num_layers=3))
  with pytest.raises(ValueError, match="shape"):
    load_peft_lora(folder, config.replace(head_dim=8))


def test_missing_files_are_named(adapter, tmp_path):
  folder, config = adapter
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    load_peft_lora(tmp_path / "nowhere", config)
  (folder / "adapter_model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="adapter_model"):
    load_peft_lora(folder, config)
