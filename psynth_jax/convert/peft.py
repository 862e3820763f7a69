"""PEFT LoRA adapters <-> psynth_jax `LoRAWeights`.

The reference release stores the synthesizer's LoRA as a PEFT adapter folder:
`adapter_config.json` plus `adapter_model.safetensors` with one pair of tensors
per adapted projection, e.g. for layer N's query projection

  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight  [R, D_in]
  base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight  [D_out, R]

Ours are A [L, D_in, R] and B [L, R, D_out] (see `psynth_jax.model.lora`), so
each tensor is transposed. PEFT computes `(alpha / R) * B(A(dropout(x)))`
(`alpha / sqrt(R)` with `use_rslora`), which is exactly our LoRA. Only plain
LoRA on the attention projections q/k/v/o of every layer maps onto ours; any
other option (DoRA, biases, MLP or head targets, per-layer ranks, ...) is
refused with an error that names it. torch is not needed: safetensors files
are read (bf16 included) and written through numpy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from psynth_jax.model.checkpoint import read_safetensors
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import TARGETS, LoRA, LoRAConfig, LoRAWeights, target_dims

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the *ForCausalLM model


class UnsupportedAdapterError(ValueError):
  """The adapter uses a PEFT option that psynth_jax's LoRA cannot represent."""


def _module_name(layer: int, target: str) -> str:
  """Name of a target projection inside the HF *ForCausalLM model."""
  return f"model.layers.{layer}.self_attn.{target}_proj"


def _tensor_name(layer: int, target: str, which: str) -> str:
  return f"{PREFIX}{_module_name(layer, target)}.lora_{which}.weight"


def _candidate_modules(num_layers: int) -> list[str]:
  """Every Linear-like module of a supported HF decoder (what target_modules may hit)."""
  names = ["lm_head", "model.embed_tokens"]
  for i in range(num_layers):
    names += [_module_name(i, t) for t in TARGETS]
    names += [f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up", "down")]
  return names


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
  """PEFT's rule: a string is a regex matched in full; a list matches exact names or suffixes."""
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, name) is not None
  return any(name == t or name.endswith("." + t) for t in target_modules)


def _targets_from_config(cfg: dict, num_layers: int) -> tuple[str, ...]:
  """The q/k/v/o targets that `target_modules` (less `exclude_modules`) selects in every layer."""
  target_modules = cfg.get("target_modules")
  exclude = cfg.get("exclude_modules")
  if not target_modules:
    raise UnsupportedAdapterError(
      "adapter_config.json has no target_modules (PEFT's per-architecture default is not"
      " supported); name the projections, e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']"
    )
  if target_modules == "all-linear" or target_modules == ["all-linear"]:
    raise UnsupportedAdapterError(
      "target_modules='all-linear' adapts the MLPs too; psynth_jax's LoRA covers q/k/v/o only"
    )
  hit = [
    n
    for n in _candidate_modules(num_layers)
    if _matches(n, target_modules) and not (exclude and _matches(n, exclude))
  ]
  others = [n for n in hit if not any(n.endswith(f".self_attn.{t}_proj") for t in TARGETS)]
  if others:
    raise UnsupportedAdapterError(
      f"target_modules={target_modules!r} adapts {others[:4]}{'...' if len(others) > 4 else ''};"
      " psynth_jax's LoRA covers only the attention projections q_proj/k_proj/v_proj/o_proj"
    )
  targets = tuple(t for t in TARGETS if any(n.endswith(f".self_attn.{t}_proj") for n in hit))
  if not targets:
    raise UnsupportedAdapterError(
      f"target_modules={target_modules!r} selects none of q_proj/k_proj/v_proj/o_proj"
    )
  for t in targets:
    layers = [i for i in range(num_layers) if _module_name(i, t) in hit]
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
  "modules_to_save": "fully trained extra modules",
  "rank_pattern": "per-module ranks",
  "alpha_pattern": "per-module alphas",
  "target_parameters": "adapted nn.Parameters",
  "trainable_token_indices": "trainable token embeddings",
  "use_qalora": "QALoRA",
  "use_bdlora": "block-diagonal LoRA",
  "layer_replication": "replicated layers",
  "alora_invocation_tokens": "activated LoRA (aLoRA)",
}


def lora_config_from_peft(cfg: dict, num_layers: int) -> LoRAConfig:
  """A `LoRAConfig` from a parsed `adapter_config.json` (refuses unsupported options)."""
  peft_type = cfg.get("peft_type", "LORA")
  if str(peft_type).upper() != "LORA":
    raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported (only LORA)")
  for key, meaning in _MUST_BE_OFF.items():
    if cfg.get(key):
      raise UnsupportedAdapterError(
        f"adapter_config.json sets {key}={cfg[key]!r} ({meaning}), which psynth_jax's LoRA"
        " does not support"
      )
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
  )


def read_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as float32 numpy, bf16 included.

  safetensors' numpy reader returns bf16 as `ml_dtypes.bfloat16` (since 0.8).
  """
  state = read_safetensors([Path(path)])
  for name, x in state.items():
    if not np.issubdtype(x.dtype, np.floating) and x.dtype != ml_dtypes.bfloat16:
      raise ValueError(f"{path}: tensor {name!r} has dtype {x.dtype}, not a float type")
  return {name: x.astype(np.float32) for name, x in state.items()}


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
  """The adapter's tensors as float32 numpy arrays (safetensors, else a legacy .bin)."""
  path = folder / WEIGHTS_FILE
  if path.exists():
    return read_safetensors_f32(path)
  legacy = folder / LEGACY_WEIGHTS_FILE
  if legacy.exists():
    import torch

    state = torch.load(legacy, map_location="cpu", weights_only=True)
    return {name: t.detach().float().numpy() for name, t in state.items()}
  raise FileNotFoundError(f"{folder} has neither {WEIGHTS_FILE} nor {LEGACY_WEIGHTS_FILE}")


def load_peft_lora(folder: str | Path, model_config: ModelConfig) -> LoRAWeights:
  """Imports a PEFT LoRA adapter folder for the model described by `model_config`.

  Args:
    folder: a folder written by `PeftModel.save_pretrained` (or `export_peft_lora`).
    model_config: the base model's config (layer count and projection sizes).

  Returns:
    `LoRAWeights` (float32) with the adapter's rank, alpha, dropout, rsLoRA flag
    and targets.

  Raises:
    UnsupportedAdapterError: an option psynth_jax cannot represent (names it).
    KeyError: adapter tensors are missing or unexpected (names them all).
    ValueError: a tensor has the wrong shape (names it and both shapes).
  """
  folder = Path(folder)
  config_path = folder / CONFIG_FILE
  try:
    cfg = json.loads(config_path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"missing {config_path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from None
  config = lora_config_from_peft(cfg, model_config.num_layers)
  tensors = _read_tensors(folder)

  n = model_config.num_layers
  want = {_tensor_name(i, t, w): (i, t, w) for i in range(n) for t in config.targets for w in "AB"}
  missing = sorted(set(want) - set(tensors))
  unexpected = sorted(set(tensors) - set(want))
  if missing or unexpected:
    raise KeyError(
      f"{folder}: adapter tensors do not match a {n}-layer model with targets"
      f" {config.targets}: missing={missing}, unexpected={unexpected}"
    )
  arrays: dict[str, np.ndarray] = {}
  for t in config.targets:
    d_in, d_out = target_dims(model_config, t)
    a = np.empty((n, d_in, config.rank), np.float32)
    b = np.empty((n, config.rank, d_out), np.float32)
    for i in range(n):
      for which, dst, shape in (("A", a, (config.rank, d_in)), ("B", b, (d_out, config.rank))):
        name = _tensor_name(i, t, which)
        w = tensors[name]
        if tuple(w.shape) != shape:
          raise ValueError(
            f"{folder}: adapter tensor {name!r} has shape {tuple(w.shape)}, expected {shape}"
            f" (r={config.rank}, model {model_config.model_type} D={model_config.hidden_size})"
          )
        dst[i] = w.T
    arrays[f"a_{t}"], arrays[f"b_{t}"] = a, b
  return lora_from_arrays(model_config, config, arrays)


def lora_from_arrays(
  model_config: ModelConfig, config: LoRAConfig, arrays: dict[str, np.ndarray]
) -> LoRAWeights:
  """`LoRAWeights` from {'a_q': [L, D_in, R], 'b_q': [L, R, D_out], ...} (shapes checked)."""
  abstract = nnx.eval_shape(lambda: LoRA(model_config, config, nnx.Rngs(0)))
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    name = ".".join(str(p) for p in path)
    if name not in arrays:
      raise KeyError(f"LoRA array {name!r} is missing")
    arr = arrays[name]
    if tuple(arr.shape) != tuple(var.shape):
      raise ValueError(f"LoRA array {name!r} has shape {arr.shape}, expected {var.shape}")
    flat.append((path, var.replace(jnp.asarray(arr, jnp.float32))))
  return LoRAWeights(config, model_config, nnx.from_flat_state(flat))


def export_peft_lora(
  lora: LoRAWeights, folder: str | Path, base_model_name_or_path: str = ""
) -> Path:
  """Writes `lora` as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads.

  Args:
    lora: the adapter.
    folder: output folder (created if needed; existing adapter files are replaced).
    base_model_name_or_path: recorded in `adapter_config.json` for PEFT's benefit.

  Returns:
    The folder.
  """
  from safetensors.numpy import save_file

  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  config = lora.config
  alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
  adapter_config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "inference_mode": True,
    "r": config.rank,
    "lora_alpha": alpha,
    "lora_dropout": config.dropout,
    "target_modules": [f"{t}_proj" for t in config.targets],
    "use_rslora": config.use_rslora,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_dora": False,
    "init_lora_weights": True,
    "modules_to_save": None,
    "layers_to_transform": None,
  }
  tensors = {}
  for t in config.targets:
    a, b = (np.asarray(x, np.float32) for x in lora.arrays(t))  # [L, D_in, R], [L, R, D_out]
    for i in range(lora.model_config.num_layers):
      tensors[_tensor_name(i, t, "A")] = np.ascontiguousarray(a[i].T)  # [R, D_in]
      tensors[_tensor_name(i, t, "B")] = np.ascontiguousarray(b[i].T)  # [D_out, R]
  save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
  (folder / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
  return folder
