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
