"""`ModelConfig.from_hf`: options we do not implement and broken files fail by name."""

import pytest

from psynth_jax.model.config import ModelConfig, UnsupportedModelError

QWEN3 = {
  "model_type": "qwen3",
  "vocab_size": 64,
  "hidden_size": 32,
  "intermediate_size": 48,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 8,
  "rope_theta": 1e6,
  "sliding_window": 16,
  "max_window_layers": 1,
  "use_sliding_window": False,
}


def test_qwen3_without_sliding_window_loads():
  config = ModelConfig.from_hf(QWEN3)
  assert config.sliding_window is None and config.qk_norm


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_sliding_window_is_refused_by_name(model_type):
  with pytest.raises(UnsupportedModelError, match="use_sliding_window=True"):
    ModelConfig.from_hf({**QWEN3, "model_type": model_type, "use_sliding_window": True})


def test_sliding_layer_types_are_refused():
  layer_types = ["full_attention", "sliding_attention"]
  with pytest.raises(UnsupportedModelError, match="sliding_attention"):
    ModelConfig.from_hf({**QWEN3, "layer_types": layer_types})
  full = ModelConfig.from_hf({**QWEN3, "layer_types": ["full_attention"] * 2})
  assert full == ModelConfig.from_hf(QWEN3)


def test_mistral_keeps_its_window():
  config = ModelConfig.from_hf({**QWEN3, "model_type": "mistral", "use_sliding_window": True})
  assert config.sliding_window == 16


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size"])
def test_missing_key_names_file_and_key(key):
  hf = {k: v for k, v in QWEN3.items() if k != key}
  with pytest.raises(KeyError, match=f"some/config.json .*{key}"):
    ModelConfig.from_hf(hf, source="some/config.json")


def test_the_14b_inference_config_splits_every_large_tensor_over_8_devices():
  """Qwen3-14B on (1, 1, 8): nothing large stays whole on a device, and the budget fits v5e."""
  import math

  import jax

  from psynth_jax import sharding
  from psynth_jax.configs import qwen3_14b, qwen3_14b_eval
  from psynth_jax.model.transformer import abstract_params

  config = qwen3_14b_eval.get_config("gsm8k")
  assert (config.mesh, config.dtype, config.worker_tokens, config.answer_tokens) == (
    "1,1,8",
    "bfloat16",
    4096,
    4096,
  )
  shape = tuple(int(x) for x in config.mesh.split(","))
  mesh = sharding.make_mesh(sharding.MeshConfig(shape))
  params = abstract_params(qwen3_14b.model_config())
  total = 0
  variables = jax.tree.leaves(params.state, is_leaf=lambda x: hasattr(x, "get_metadata"))
  assert len(variables) == 40 * 11 + 3  # 11 per layer; embedding, final norm, head
  for var in variables:
    value, axes = var.get_value(), var.get_metadata().get("axes")
    total += math.prod(value.shape) * 2
    spec = sharding.logical_to_spec(axes, sharding.DEFAULT_RULES, value.shape, mesh)
    if len(value.shape) >= 2:
      assert "tensor" in tuple(spec), (axes, value.shape, spec)
  budget = qwen3_14b_eval.inference_memory(batch_problems=config.batch_problems)
  assert abs(budget["weights"] - total / 8 / 1e9) < 1e-9
  assert budget["peak"] == budget["peak_text"] < 16  # a v5e chip's HBM
  assert budget["text_prefill_scores"] < budget["text_cache"]  # blocked attention


def test_the_14b_training_config_rematerialises():
  from psynth_jax.configs import qwen3_14b
  from psynth_jax.model.remat import POLICIES

  assert qwen3_14b.get_config().train.remat == "dots_no_batch" in POLICIES
