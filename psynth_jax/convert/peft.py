"""PEFT LoRA adapters <-> psynth_jax `LoRAWeights`.

The reference release stores the synthesizer's LoRA as a PEFT adapter folder:
`adapter_config.json` plus `adapter_model.safetensors` with one pair of tensors
per adapted projection, e.g. for layer N's query projection

  base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight  [R, D_in]
  base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight  [D_out, R]

and `...layers.N.mlp.{gate,up,down}_proj.lora_{A,B}.weight` for the MLP's.
Ours are A [L, D_in, R] and B [L, R, D_out] (see `psynth_jax.model.lora`), so
each tensor is transposed. PEFT computes `(alpha / R) * B(A(dropout(x)))`
(`alpha / sqrt(R)` with `use_rslora`), which is exactly our LoRA. Only plain
LoRA on the attention projections q/k/v/o and the dense MLP's gate/up/down, in
every layer, maps onto ours; any other option (DoRA, biases, lm_head or
embedding targets, per-layer ranks, `target_modules="all-linear"`, ...) is
refused with an error that names it, and so are MLP targets on a model with
mixture-of-experts layers (`psynth_jax.model.lora.check_targets`). The layer
count, D_in, D_out and rank come from the tensors, so a folder loads on its
own; a model config, or the model itself, only adds checks.

Embedding copies. PEFT's `save_embedding_layers=True` (the release: its
vocabulary was resized to V' = 151,669 of Qwen3's 151,936) and
`modules_to_save=["lm_head"]` / `["embed_tokens"]` store full copies

  base_model.model.model.embed_tokens.weight  [V', D]
  base_model.model.lm_head.weight             [V', D]

(torch layout; our unembedding is [D, V]). The adapter then records
`vocab_size = V'`: logits of ids >= V' are -inf wherever it is used. The
copies themselves are not part of the adapter: `load_peft_lora(..., lm=lm)`
compares them with the base model's first V' rows and warns if they differ,
and `apply_adapter_embeddings` makes a model that uses them instead.

Files are read tensor by tensor: safetensors memory-mapped (`safe_open`),
legacy `adapter_model.bin` through `torch.load(..., weights_only=True,
mmap=True)`. The key set and shapes are checked from the headers before any
data is read, and the embedding copies (3 GB in the release) are only ever
read in row chunks in their own dtype, never whole, never as float32.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from psynth_jax.convert.adapter_files import (
  CONFIG_FILE,
  EMBEDDING_KEYS,
  LEGACY_WEIGHTS_FILE,
  PREFIX,
  WEIGHTS_FILE,
  open_adapter,
)
from psynth_jax.convert.peft_embeddings import apply_adapter_embeddings, check_copies, copy_shapes
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import (
  MLP_TARGETS,
  TARGETS,
  LoRAConfig,
  LoRAWeights,
  check_lora,
  check_targets,
  target_dims,
)

__all__ = [
  "CONFIG_FILE",
  "EMBEDDING_KEYS",
  "LEGACY_WEIGHTS_FILE",
  "WEIGHTS_FILE",
  "UnsupportedAdapterError",
  "apply_adapter_embeddings",
  "export_peft_lora",
  "load_peft_lora",
  "lora_config_from_peft",
]

_LORA_TENSOR = re.compile(
  re.escape(PREFIX)
  + r"model\.layers\.(\d+)\.(?:self_attn\.[qkvo]|mlp\.(?:gate|up|down))_proj\.lora_[AB]\.weight"
)
_PROJECTIONS = "/".join(f"{t}_proj" for t in TARGETS)
_log = logging.getLogger(__name__)
_unchecked_logged: set[str] = set()  # folders whose unchecked copies were reported


class UnsupportedAdapterError(ValueError):
  """The adapter uses a PEFT option that psynth_jax's LoRA cannot represent."""


def _module_name(layer: int, target: str) -> str:
  """Name of a target projection inside the HF *ForCausalLM model."""
  block = "mlp" if target in MLP_TARGETS else "self_attn"
  return f"model.layers.{layer}.{block}.{target}_proj"


def _tensor_name(layer: int, target: str, which: str) -> str:
  return f"{PREFIX}{_module_name(layer, target)}.lora_{which}.weight"


def _candidate_modules(num_layers: int) -> list[str]:
  """Every Linear-like module of a supported HF decoder (what target_modules may hit)."""
  names = ["lm_head", "model.embed_tokens"]
  for i in range(num_layers):
    names += [_module_name(i, t) for t in TARGETS]
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
  ours = {_module_name(i, t): t for i in range(num_layers) for t in TARGETS}
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


def _read_config(folder: Path) -> dict:
  config_path = folder / CONFIG_FILE
  try:
    return json.loads(config_path.read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"missing {config_path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------
# Import.


def _num_layers(names: set[str], folder: Path) -> int:
  layers = [int(m.group(1)) for n in names if (m := _LORA_TENSOR.fullmatch(n))]
  if not layers:
    raise KeyError(f"{folder}: no LoRA tensors (like {_tensor_name(0, 'q', 'A')!r})")
  return max(layers) + 1


def _target_shapes(f, folder: Path, config: LoRAConfig, n: int, model_config) -> dict:
  """{target: (D_in, D_out)}: the model's, or layer 0's; every layer's tensors checked."""
  dims = {}
  for t in config.targets:
    if model_config is not None:
      d_in, d_out = target_dims(model_config, t)
    else:
      d_in = f.shape(_tensor_name(0, t, "A"))[-1]
      d_out = f.shape(_tensor_name(0, t, "B"))[0]
    for i in range(n):
      for which, shape in (("A", (config.rank, d_in)), ("B", (d_out, config.rank))):
        name = _tensor_name(i, t, which)
        if f.shape(name) != shape:
          where = f"model D={model_config.hidden_size}" if model_config else "layer 0's shapes"
          raise ValueError(
            f"{folder}: adapter tensor {name!r} has shape {f.shape(name)}, expected {shape}"
            f" (r={config.rank}, {where})"
          )
    dims[t] = (d_in, d_out)
  if len(_model_dims(dims)) > 1:
    raise ValueError(f"{folder}: the adapter's projections disagree on D: (D_in, D_out) {dims}")
  mlp_dims = {
    d_in if t == "down" else d_out for t, (d_in, d_out) in dims.items() if t in MLP_TARGETS
  }
  if len(mlp_dims) > 1:
    raise ValueError(f"{folder}: the adapter's MLP projections disagree on F: (D_in, D_out) {dims}")
  return dims


_WRITES_D = ("o", "down")  # the projections whose output is the residual stream


def _model_dims(dims: dict[str, tuple[int, int]]) -> set[int]:
  """The model dims D that {target: (D_in, D_out)} implies (o, down write D; the rest read it)."""
  return {d_in for t, (d_in, _) in dims.items() if t not in _WRITES_D} | {
    d_out for t, (_, d_out) in dims.items() if t in _WRITES_D
  }


def _hidden_size(dims: dict[str, tuple[int, int]]) -> int:
  return next(iter(_model_dims(dims)))


def load_peft_lora(
  folder: str | Path,
  model_config: ModelConfig | None = None,
  *,
  lm=None,
  embeddings: str = "check",
) -> LoRAWeights:
  """Imports a PEFT LoRA adapter folder; its shapes come from its own tensors.

  Args:
    folder: a folder written by `PeftModel.save_pretrained` (or `export_peft_lora`).
    model_config: optional; the adapter must then fit this model (layer count,
      projection sizes, vocabulary).
    lm: optional `LanguageModel` the adapter is for: checks it like
      `model_config` and (with embeddings="check") compares the adapter's
      embedding copies, if any, with the model's first V' rows, warning with
      how many rows differ (see `apply_adapter_embeddings`).
    embeddings: "check" (default) or "ignore" (skip that comparison).

  Returns:
    `LoRAWeights` (float32) with the adapter's rank, alpha, dropout, rsLoRA
    flag and targets, and `vocab_size` = V' if it holds embedding copies.

  Raises:
    UnsupportedAdapterError: an option psynth_jax cannot represent (names it).
    KeyError: adapter tensors are missing or unexpected (names them all).
    ValueError: a tensor has the wrong shape (names it and both shapes), or
      the adapter does not fit `model_config` / `lm`.
  """
  folder = Path(folder)
  if embeddings not in ("check", "ignore"):
    raise ValueError(f"embeddings must be 'check' or 'ignore', got {embeddings!r}")
  if lm is not None:
    if model_config is not None and model_config != lm.config:
      raise ValueError("model_config and lm.config differ; pass one of them")
    model_config = lm.config
  cfg = _read_config(folder)
  with open_adapter(folder) as f:
    names = set(f.keys())
    copies = copy_shapes(f, folder, model_config)
    lora_names = names - {EMBEDDING_KEYS[m] for m in copies}
    n = model_config.num_layers if model_config else _num_layers(lora_names, folder)
    vocab = next(iter(copies.values()))[0] if copies else None
    config = lora_config_from_peft(cfg, n, vocab)
    if model_config is not None:  # before the tensor names, which would blame the experts' keys
      check_targets(config.targets, model_config)
    want = {_tensor_name(i, t, w) for i in range(n) for t in config.targets for w in "AB"}
    missing, unexpected = sorted(want - lora_names), sorted(lora_names - want)
    if missing or unexpected:
      raise KeyError(
        f"{folder}: adapter tensors do not match a {n}-layer model with targets"
        f" {config.targets}: missing={missing}, unexpected={unexpected}"
      )
    dims = _target_shapes(f, folder, config, n, model_config)
    if copies and {d for _, d in copies.values()} != {_hidden_size(dims)}:
      raise ValueError(f"{folder}: embedding copies {copies} do not match the LoRA's D {dims}")
    arrays = {}
    for t, (d_in, d_out) in dims.items():
      a = np.empty((n, d_in, config.rank), np.float32)
      b = np.empty((n, config.rank, d_out), np.float32)
      for i in range(n):
        a[i] = f.read(_tensor_name(i, t, "A")).astype(np.float32).T
        b[i] = f.read(_tensor_name(i, t, "B")).astype(np.float32).T
      arrays[f"a_{t}"], arrays[f"b_{t}"] = a, b
    lora = LoRAWeights.from_arrays(config, arrays)
    if model_config is not None:
      check_lora(lora, model_config)
    if copies and embeddings == "check":
      if lm is not None:
        check_copies(f, folder, copies, lm)
      elif str(folder.resolve()) not in _unchecked_logged:
        _unchecked_logged.add(str(folder.resolve()))
        _log.warning(
          "%s: the adapter holds copies of %s for a vocabulary of %d ids; they were not compared"
          " with the base model's (pass lm= to load_peft_lora to check them)",
          folder,
          " and ".join(copies),
          vocab,
        )
  return lora


# ---------------------------------------------------------------------------
# Export.


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
  if config.vocab_size is not None:
    # PEFT records a resized vocabulary only through embedding copies, which belong to
    # the model, not to this adapter: the exported folder loads without the limit.
    warnings.warn(
      f"{folder}: the adapter's vocab_size={config.vocab_size} is not exported (PEFT keeps it"
      " only as embedding copies); the exported adapter will not mask ids >= it",
      stacklevel=2,
    )
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
    for i in range(lora.num_layers):
      tensors[_tensor_name(i, t, "A")] = np.ascontiguousarray(a[i].T)  # [R, D_in]
      tensors[_tensor_name(i, t, "B")] = np.ascontiguousarray(b[i].T)  # [D_out, R]
  save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
  (folder / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
  return folder
