"""LoRA on the dense MLP's gate / up / down projections, beside q/k/v/o.

Same pattern as tests/test_lora.py: tiny random transformers models converted
with `load_hf_folder`, `peft` adapting all seven projections with random
non-zero A and B, our forward with the imported adapter against PEFT's logits;
our exports loaded by PEFT and PEFT's saves read back. MLP targets on a model
with mixture-of-experts layers, and names that are not projections, are refused.
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from test_lora import random_lora

from psynth_jax import configs
from psynth_jax.configs import synthetic as synthetic_config
from psynth_jax.configs.base import default_config
from psynth_jax.convert.hf import load_hf_folder
from psynth_jax.convert.peft import UnsupportedAdapterError, export_peft_lora, load_peft_lora
from psynth_jax.language_model import LanguageModel
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import (
  ATTENTION_TARGETS,
  MLP_TARGETS,
  TARGETS,
  LoRAConfig,
  LoRALayer,
  LoRAWeights,
  check_lora,
)
from psynth_jax.testing import GEMMA3_TINY, hf_model, tiny_moe_config
from psynth_jax.train import checkpoints, trainer
from psynth_jax.train.trainer import lora_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
ALL_MODULES = [f"{t}_proj" for t in TARGETS]
SMALL = dict(
  vocab_size=64,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  max_position_embeddings=64,
  num_attention_heads=4,
  num_key_value_heads=2,
)
# family -> (HF config class, config kwargs, extra peft LoraConfig kwargs)
FAMILIES = {
  "qwen2_bias": (transformers.Qwen2Config, SMALL, dict(r=4, lora_alpha=8, lora_dropout=0.1)),
  "llama_hd16_rslora": (
    transformers.LlamaConfig,
    {**SMALL, "head_dim": 16},
    dict(r=3, lora_alpha=5, use_rslora=True),
  ),
  "gemma3_geglu": (
    transformers.Gemma3TextConfig,
    {k: v for k, v in GEMMA3_TINY.items() if k != "model_type"},
    dict(r=2, lora_alpha=4),
  ),
}
# Std of the random A and B. Gemma's larger activations amplify float32 rounding: at 0.3
# both torch and we are ~5e-5 off a float64 torch; at 0.1, ~1e-5 (and the adapter still
# moves the logits by far more than the tolerance, asserted below).
LORA_STD = {"qwen2_bias": 0.3, "llama_hd16_rslora": 0.3, "gemma3_geglu": 0.1}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """family -> (saved base folder, tokens [2, 11], our LanguageModel); built once."""
  cache = {}

  def get(family):
    if family not in cache:
      config_cls, kwargs, _ = FAMILIES[family]
      folder = tmp_path_factory.mktemp(family)
      hf_model(config_cls, 0, **kwargs).save_pretrained(folder)
      tokens = np.random.default_rng(1).integers(0, kwargs["vocab_size"], (2, 11))
      cache[family] = (folder, tokens, LanguageModel(load_hf_folder(folder)))
    return cache[family]

  return get


def torch_logits(model, tokens) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


def ours(lm, tokens, lora=None) -> np.ndarray:
  return np.asarray(lm.logits(tokens, lora=lora))


def only(lora: LoRAWeights, targets) -> LoRAWeights:
  """The same adapter restricted to `targets`."""
  config = dataclasses.replace(lora.config, targets=tuple(targets))
  arrays = {f"{w}_{t}": np.asarray(lora.arrays(t)["ab".index(w)]) for t in targets for w in "ab"}
  return LoRAWeights.from_arrays(config, arrays)


def assert_same_arrays(x: LoRAWeights, y: LoRAWeights):
  assert x.config.targets == y.config.targets
  for t in x.config.targets:
    for a, b in zip(x.arrays(t), y.arrays(t), strict=True):
      np.testing.assert_array_equal(a, b)


def test_targets_keep_the_attention_order_and_default():
  # `LoRALayer.delta` folds a target's index into its dropout key: q/k/v/o keep 0..3.
  assert TARGETS[:4] == ATTENTION_TARGETS == ("q", "k", "v", "o")
  assert TARGETS[4:] == MLP_TARGETS == ("gate", "up", "down")
  assert LoRAConfig().targets == ATTENTION_TARGETS


def test_a_fresh_mlp_adapter_is_the_base_model(hf_models):
  _, tokens, lm = hf_models("qwen2_bias")
  lora = LoRAWeights.init(lm.config, LoRAConfig(rank=4, targets=TARGETS))
  d, f = lm.config.hidden_size, lm.config.intermediate_size
  assert lora.dims("gate") == lora.dims("up") == (d, f) and lora.dims("down") == (f, d)
  assert all(not np.asarray(lora.arrays(t)[1]).any() for t in TARGETS)
  assert all(np.asarray(lora.arrays(t)[0]).any() for t in TARGETS)
  np.testing.assert_array_equal(ours(lm, tokens, lora), ours(lm, tokens))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_seven_targets_match_peft(family, hf_models, tmp_path):
  folder, tokens, lm = hf_models(family)
  base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  peft_kwargs = FAMILIES[family][2]
  model = peft.get_peft_model(base, peft.LoraConfig(target_modules=ALL_MODULES, **peft_kwargs))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_A" in name or "lora_B" in name:
        p.copy_(LORA_STD[family] * torch.randn_like(p))  # B too: PEFT starts it at zero
  model.eval()
  want = torch_logits(model, tokens)
  model.save_pretrained(tmp_path)
  names = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
  assert sorted(names) == sorted(ALL_MODULES)

  lora = load_peft_lora(tmp_path, lm.config)
  assert lora.config.targets == TARGETS
  assert lora.config.rank == peft_kwargs["r"]
  assert lora.config.use_rslora == peft_kwargs.get("use_rslora", False)
  got = ours(lm, tokens, lora)
  err = np.abs(got - want).max()
  print(f"{family}: max |dlogit| vs PEFT = {err:.2e} (logits up to {np.abs(want).max():.1f})")
  assert err <= TOL
  # The MLP adapters matter: without them the logits move well beyond the tolerance.
  assert np.abs(got - ours(lm, tokens, only(lora, ATTENTION_TARGETS))).max() > 1e-2


@pytest.mark.parametrize("targets", [TARGETS, ("q", "gate", "down"), MLP_TARGETS], ids=str)
def test_export_loads_in_peft_and_round_trips(targets, hf_models, tmp_path):
  folder, tokens, lm = hf_models("qwen2_bias")
  lora = random_lora(lm, LoRAConfig(rank=3, alpha=6.0, targets=targets))
  out = tmp_path / "adapter"
  export_peft_lora(lora, out, base_model_name_or_path=str(folder))
  saved = json.loads((out / "adapter_config.json").read_text())
  assert saved["target_modules"] == [f"{t}_proj" for t in targets]

  base = transformers.AutoModelForCausalLM.from_pretrained(folder)
  model = peft.PeftModel.from_pretrained(base, out).eval()
  adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
  assert adapted == {f"{t}_proj" for t in targets}
  err = np.abs(ours(lm, tokens, lora) - torch_logits(model, tokens)).max()
  print(f"export {targets}: max |dlogit| vs PEFT = {err:.2e}")
  assert err <= TOL

  again = load_peft_lora(out, lm.config)
  assert again.config == lora.config
  assert_same_arrays(again, lora)
  resaved = tmp_path / "resaved"  # PEFT's own save of what it loaded
  model.save_pretrained(resaved)
  assert_same_arrays(load_peft_lora(resaved), lora)  # shapes from the tensors alone


def test_mlp_dropout_masks_each_projection_input_on_its_own():
  rng = np.random.default_rng(0)
  a, b = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32), jnp.eye(2, 8, dtype=jnp.float32)
  x = jnp.ones((1, 5, 8), jnp.float32)
  weights = {t: (a, b) for t in TARGETS}
  plain = LoRALayer(weights, 1.0, dropout=0.5)  # no key: no dropout
  np.testing.assert_array_equal(plain.delta("gate", x), plain.delta("up", x))
  dropped = LoRALayer(weights, 1.0, dropout=0.5, rng=jax.random.key(0))
  deltas = {t: np.asarray(dropped.delta(t, x)) for t in ("q", "gate", "up", "down")}
  assert len({d.tobytes() for d in deltas.values()}) == 4  # four masks
  # q keeps the key it had before the MLP targets existed ("qkvo".index("q") == 0).
  key = jax.random.fold_in(jax.random.key(0), 0)
  keep = jax.random.bernoulli(key, 0.5, x.shape)
  np.testing.assert_allclose(deltas["q"], (jnp.where(keep, 2.0, 0.0) @ a) @ b, rtol=1e-6)


# --- refusals ------------------------------------------------------------------------


def test_mlp_targets_are_refused_on_a_mixture_of_experts_model(tmp_path):
  config = tiny_moe_config("qwen3_moe")
  moe = [i for i in range(config.num_layers) if config.is_moe(i)]
  assert moe and len(moe) < config.num_layers  # dense layer 0 does not make it allowed
  layers = str(moe).replace("[", r"\[").replace("]", r"\]")
  message = rf"\['gate'\].*layers {layers}.*mixture-of-experts"
  with pytest.raises(ValueError, match=message):
    LoRAWeights.init(config, LoRAConfig(rank=2, targets=("q", "gate")))
  LoRAWeights.init(config, LoRAConfig(rank=2))  # attention targets stay fine

  # An adapter from elsewhere (the shapes fit a dense model of the same sizes).
  dense = config.replace(moe_layers=())
  lora = LoRAWeights.init(dense, LoRAConfig(rank=2, targets=("q", "gate")))
  check_lora(lora, dense)
  with pytest.raises(ValueError, match=message):
    check_lora(lora, config)
  export_peft_lora(lora, tmp_path)
  with pytest.raises(ValueError, match=message):  # named before any tensor name is compared
    load_peft_lora(tmp_path, config)


@pytest.mark.parametrize(
  "targets", [("q", "lm_head"), ("mlp",), ("gate_proj",), (), ("q", "q")], ids=str
)
def test_unknown_or_repeated_targets_are_refused(targets):
  with pytest.raises(ValueError, match="LoRA targets must be"):
    LoRAConfig(targets=targets)


@pytest.mark.parametrize(
  "target_modules, message",
  [
    (["gate_proj", "embed_tokens"], "embed_tokens"),
    (["down_proj", "lm_head"], "lm_head"),
    ("all-linear", "all-linear"),
    (r"model\.layers\.0\.mlp\.up_proj", r"up_proj in layers \[0\] only"),
    (["router"], "none of"),
  ],
  ids=str,
)
def test_peft_targets_beyond_the_seven_projections_are_refused(target_modules, message, tmp_path):
  lora = LoRAWeights.from_arrays(
    LoRAConfig(rank=2, targets=("up",)),
    {"a_up": np.zeros((2, 32, 2), np.float32), "b_up": np.zeros((2, 2, 48), np.float32)},
  )
  export_peft_lora(lora, tmp_path)
  assert load_peft_lora(tmp_path).config.targets == ("up",)
  path = tmp_path / "adapter_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": target_modules}))
  with pytest.raises(UnsupportedAdapterError, match=message):
    load_peft_lora(tmp_path)


def test_mlp_targets_from_the_training_config():
  fv = flags.FlagValues()  # as experiments/train.py defines its --config
  path = Path(configs.__file__).parent / "synthetic.py"
  argv = [
    "prog",
    f"--config={path}:tiny",
    "--config.lora.targets=('q','k','v','o','gate','up','down')",
  ]
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  assert lora_config(fv.config).targets == TARGETS
  config = default_config()
  assert lora_config(config) == LoRAConfig()  # the paper's
  config.lora.targets = ("q", "gate,up", "down")  # `--config.lora.targets=gate,up` arrives so
  assert lora_config(config).targets == ("q", "gate", "up", "down")
  config.lora.targets = ("q", "mlp")
  with pytest.raises(ValueError, match="LoRA targets must be"):
    lora_config(config)


def _train_config(targets, **model_changes):
  """The checkpoint tests' tiny trainer run, shorter, with `lora.targets`."""
  config = synthetic_config.get_config("random,fast")
  config.model.init.update(num_layers=2, hidden_size=32, intermediate_size=64, **model_changes)
  config.data.num_examples = 8
  config.batch.update(batch_size=4, max_branches=4, branch_rows=160, synth_tokens=112)
  config.lora.update(rank=4, targets=targets)
  config.train.update(num_steps=2, trainable="lora_only")
  config.optimizer.learning_rate = 1e-2
  config.mesh.shape = (1, 1, 1)
  return config


def test_the_trainer_trains_and_exports_mlp_targets(tmp_path):
  result = trainer.train(_train_config(TARGETS), str(tmp_path))
  saved = json.loads((Path(result.export_dir) / "lora" / "adapter_config.json").read_text())
  assert saved["target_modules"] == ALL_MODULES
  assert result.state.params["lora"].config.targets == TARGETS
  base_config = ModelConfig(**_train_config(TARGETS).model.init.to_dict())
  _, lora = checkpoints.load_export(result.export_dir, base_config)
  assert lora.config.targets == TARGETS
  assert all(np.abs(np.asarray(lora.arrays(t)[1])).max() > 0 for t in MLP_TARGETS)


def test_the_trainer_refuses_mlp_targets_on_experts_before_reading_data(tmp_path):
  moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_layers=(1,))
  with pytest.raises(ValueError, match=r"layers \[1\] .*mixture-of-experts"):
    trainer.train(_train_config(("q", "down"), **moe), str(tmp_path))
  assert not (tmp_path / "traces").exists()
