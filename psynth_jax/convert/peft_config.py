"""A PEFT `adapter_config.json` -> psynth_jax `LoRAConfig`, refusing what ours cannot be.

Only plain LoRA on the attention projections q/k/v/o and the dense MLP's
gate/up/down, in every layer, maps onto psynth_jax's LoRA: every other option
(DoRA, biases, per-module ranks, a subset of layers, `target_modules="all-linear"`,
full module copies other than the embeddings, ...) raises `UnsupportedAdapterError`
naming it. `target_modules` is matched as PEFT matches it (a string is a regex over
the full module name, a list names modules or their suffixes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from psynth_jax.convert.adapter_files import CONFIG_FILE, EMBEDDING_KEYS, PREFIX
from psynth_jax.model.lora import MLP_TARGETS, TARGETS, LoRAConfig

_PROJECTIONS = "/".join(f"{t}_proj" for t in TARGETS)


class UnsupportedAdapterError(ValueError):
  """The adapter uses a PEFT option that psynth_jax's LoRA cannot represent."""


def module_name(layer: int, target: str) -> str:
  """Name of a target projection inside the HF *ForCausalLM model."""
  block = "mlp" if target in MLP_TARGETS else "self_attn"
  return f"model.layers.{layer}.{block}.{target}_proj"


def tensor_name(layer: int, target: str, which: str) -> str:
  return f"{PREFIX}{module_name(layer, target)}.lora_{which}.weight"


def _candidate_modules(num_layers: int) -> list[str]:
  """Every Linear-like module of a supported HF decoder (what target_modules may hit)."""
  names = ["lm_head", "model.embed_tokens"]
  for i in range(num_layers):
    names += [module_name(i, t) for t in TARGETS]
  return names


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
  """PEFT's rule: a string is a regex matched in full; a list matches exact names or suffixes."""
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, name) is not None
  return any(name == t or name.endswith("." + t) for t in target_modules)


def _targets_from_config(cfg: dict, num_layers: int) -> tuple[str, ...]:
  """The `TARGETS` that `target_modules` (less `exclude_modules`) selects in every layer."""
  target_modules = cfg.get("target_modules")
  exclude = cfg.get("exclude_modules")
  if not target_modules:
    raise UnsupportedAdapterError(
      "adapter_config.json has no target_modules (PEFT's per-architecture default is not"
      " supported); name the projections, e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']"
    )
  if target_modules == "all-linear" or target_modules == ["all-linear"]:
    # Its meaning is "whatever Linear layers the model has": PEFT saves the resolved list.
    raise UnsupportedAdapterError(
      "target_modules='all-linear' names no projections; name them, e.g."
      f" {[f'{t}_proj' for t in TARGETS]}"
    )
  hit = [
    n
    for n in _candidate_modules(num_layers)
    if _matches(n, target_modules) and not (exclude and _matches(n, exclude))
  ]
  ours = {module_name(i, t): t for i in range(num_layers) for t in TARGETS}
  others = [n for n in hit if n not in ours]
  if others:
    raise UnsupportedAdapterError(
      f"target_modules={target_modules!r} adapts {others[:4]}{'...' if len(others) > 4 else ''};"
      f" psynth_jax's LoRA covers only the projections {_PROJECTIONS}"
    )
  targets = tuple(t for t in TARGETS if any(ours[n] == t for n in hit))
  if not targets:
    raise UnsupportedAdapterError(
      f"target_modules={target_modules!r} selects none of {_PROJECTIONS}"
    )
  for t in targets:
    layers = [i for i in range(num_layers) if module_name(i, t) in hit]
    if len(layers) != num_layers:
      raise UnsupportedAdapterError(
        f"target_modules={target_modules!r} adapts {t}_proj in layers {layers} only;"
        f" psynth_jax's LoRA adapts every one of the {num_layers} layers"
      )
  return targets


# Options whose value must be "off" (None, False, empty): PEFT key -> what it would need.
_MUST_BE_OFF = {
  "use_dora": "DoRA (magnitude vectors)",
  "lora_bias": "LoRA biases",
  "fan_in_fan_out": "Conv1D-style transposed weights",
  "rank_pattern": "per-module ranks",
  "alpha_pattern": "per-module alphas",
  "target_parameters": "adapted nn.Parameters",
  "trainable_token_indices": "trainable token embeddings",
  "use_qalora": "QALoRA",
  "use_bdlora": "block-diagonal LoRA",
  "layer_replication": "replicated layers",
  "alora_invocation_tokens": "activated LoRA (aLoRA)",
}


def _check_modules_to_save(cfg: dict) -> None:
  """Full module copies: embed_tokens / lm_head are embedding copies; anything else is refused."""
  modules = cfg.get("modules_to_save") or []
  modules = [modules] if isinstance(modules, str) else list(modules)
  others = [m for m in modules if m.split(".")[-1] not in EMBEDDING_KEYS]
  if others:
    raise UnsupportedAdapterError(
      f"adapter_config.json sets modules_to_save={modules!r}: psynth_jax cannot use full"
      f" trained copies of {others} (only embed_tokens / lm_head, read as embedding copies)"
    )


def lora_config_from_peft(cfg: dict, num_layers: int, vocab_size: int | None = None) -> LoRAConfig:
  """A `LoRAConfig` from a parsed `adapter_config.json` (refuses unsupported options).

  `vocab_size`: rows of the adapter's embedding copies (V'), if it has any.
  """
  peft_type = cfg.get("peft_type", "LORA")
  if str(peft_type).upper() != "LORA":
    raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported (only LORA)")
  for key, meaning in _MUST_BE_OFF.items():
    if cfg.get(key):
      raise UnsupportedAdapterError(
        f"adapter_config.json sets {key}={cfg[key]!r} ({meaning}), which psynth_jax's LoRA"
        " does not support"
      )
  _check_modules_to_save(cfg)
  layers = cfg.get("layers_to_transform")
  if layers is not None:
    layers = {layers} if isinstance(layers, int) else set(layers)
    if layers != set(range(num_layers)):
      raise UnsupportedAdapterError(
        f"layers_to_transform={sorted(layers)} adapts a subset of the {num_layers} layers;"
        " psynth_jax's LoRA adapts every layer"
      )
  bias = cfg.get("bias", "none")
  if bias != "none":
    raise UnsupportedAdapterError(f"bias={bias!r} is not supported (only 'none')")
  for key in ("r", "lora_alpha"):
    if key not in cfg:
      raise KeyError(f"adapter_config.json has no {key!r}")
  return LoRAConfig(
    rank=int(cfg["r"]),
    alpha=float(cfg["lora_alpha"]),
    dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
    targets=_targets_from_config(cfg, num_layers),
    use_rslora=bool(cfg.get("use_rslora", False)),
    vocab_size=vocab_size,
  )


def read_config(folder: Path) -> dict:
  config_path = folder / CONFIG_FILE
  try:
    return json.loads(config_path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"missing {config_path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from None
