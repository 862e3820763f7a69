"""Views of Hugging Face state dicts under the tensor names of their checkpoint files.

The name tables of `hf.py` speak the names a checkpoint's safetensors files use. Two
in-memory layouts differ from them and are read through a view instead of a copy:
a multimodal Gemma 3 checkpoint nests its text model under another prefix
(`text_model_state`), and transformers v5 fuses the experts of a mixture-of-experts
layer into one tensor per projection (`expert_state`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from psynth_jax.model.config import ModelConfig

# Mixture-of-experts layers, as checkpoint files name them (transformers v5 fuses the
# experts in memory, `UnfusedExperts`, and writes these names back when it saves):
# (module, per-expert gate, up and down names).
MOE_NAMES = {
  "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
  "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


# A multimodal `gemma3` checkpoint (Gemma3ForConditionalGeneration) nests the text model:
# saved files name it language_model.model.* (transformers' v4 layout, which v5 still
# writes), a v5 model in memory model.language_model.*. Only the text part is read; the
# vision tower and projector are left out by name.
TEXT_MODEL_PREFIXES = ("language_model.model.", "model.language_model.")
TEXT_HEADS = ("language_model.lm_head.weight", "lm_head.weight")
VISION_PREFIXES = (
  "vision_tower.",
  "multi_modal_projector.",
  "model.vision_tower.",
  "model.multi_modal_projector.",
)


class TextModelState(Mapping):
  """A multimodal checkpoint's text-model tensors under their text-only HF names."""

  def __init__(self, state: Mapping[str, np.ndarray], prefix: str):
    self.state = state
    self.names = {}  # text-only name -> name in `state`
    for name in state:
      if name.startswith(prefix):
        self.names["model." + name[len(prefix) :]] = name
      elif name in TEXT_HEADS:
        self.names["lm_head.weight"] = name
      elif not name.startswith(VISION_PREFIXES):
        self.names[name] = name  # neither text nor vision: reported as left over

  def __getitem__(self, name: str) -> np.ndarray:
    return self.state[self.names[name]]

  def __iter__(self):
    return iter(self.names)

  def __len__(self) -> int:
    return len(self.names)


def text_model_state(config: ModelConfig, state: Mapping[str, np.ndarray]) -> Mapping:
  """`state` itself, or for a multimodal Gemma 3 checkpoint its text model's tensors."""
  if config.model_type != "gemma3_text":
    return state
  for prefix in TEXT_MODEL_PREFIXES:
    if any(name.startswith(prefix) for name in state):
      return TextModelState(state, prefix)
  return state


class UnfusedExperts(Mapping):
  """A transformers v5 in-memory state dict (experts fused: `mlp.experts.gate_up_proj`
  [E, 2 F_E, D] with gate first, `mlp.experts.down_proj` [E, D, F_E]; Mixtral's module
  renamed `mlp`) under the per-expert names of its checkpoint files."""

  FUSED = re.compile(
    r"(model\.layers\.\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)"
  )

  def __init__(self, state: Mapping[str, np.ndarray], config: ModelConfig):
    self.state = state
    block, gate, up, down = MOE_NAMES[config.model_type]
    f = config.moe_intermediate_size
    self.views = {}  # file name -> (name in `state`, index into it or None)
    for name in state:
      m = self.FUSED.fullmatch(name)
      if m is None:
        self.views[name] = (name, None)
        continue
      layer, what = m.groups()
      prefix = f"{layer}.{block}"
      if what == "gate.weight":
        self.views[f"{prefix}.gate.weight"] = (name, None)
      for e in range(config.num_experts if what != "gate.weight" else 0):
        if what == "experts.gate_up_proj":
          self.views[f"{prefix}.experts.{e}.{gate}.weight"] = (name, (e, slice(0, f)))
          self.views[f"{prefix}.experts.{e}.{up}.weight"] = (name, (e, slice(f, 2 * f)))
        else:
          self.views[f"{prefix}.experts.{e}.{down}.weight"] = (name, (e,))

  def __getitem__(self, name: str) -> np.ndarray:
    source, index = self.views[name]
    x = self.state[source]
    return x if index is None else np.asarray(x)[index]

  def __iter__(self):
    return iter(self.views)

  def __len__(self) -> int:
    return len(self.views)


def expert_state(config: ModelConfig, state: Mapping[str, np.ndarray]) -> Mapping:
  """`state` itself, or a fused-expert (transformers v5 in-memory) state per expert."""
  if config.model_type in MOE_NAMES and any(
    name.endswith("mlp.experts.gate_up_proj") for name in state
  ):
    return UnfusedExperts(state, config)
  return state
