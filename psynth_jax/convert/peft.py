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
refused with an error that names it (`peft_config`), and so are MLP targets on a model with
mixture-of-experts layers (`psynth_jax.model.lora.check_targets`). The layer
count, D_in, D_out and rank come from the tensors, so a folder loads on its
own; a model config, or the model itself, only adds checks.

Embedding copies. PEFT's `save_embedding_layers=True` (the release: its
vocabulary was resized to V' = 151,669 of Qwen3's 151,936) and
`modules_to_save=["lm_head"]` / `["embed_tokens"]` store full copies

  base_model.model.model.embed_tokens.weight  [V', D]
  base_model.model.lm_head.weight             [V', D]

(torch's layout and ours). The adapter then records
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
from psynth_jax.convert.peft_config import (
  UnsupportedAdapterError,
  lora_config_from_peft,
  read_config,
  tensor_name,
)
from psynth_jax.convert.peft_embeddings import apply_adapter_embeddings, check_copies, copy_shapes
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import (
  MLP_TARGETS,
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
_log = logging.getLogger(__name__)
_unchecked_logged: set[str] = set()  # folders whose unchecked copies were reported


# ---------------------------------------------------------------------------
# Import.


def _num_layers(names: set[str], folder: Path) -> int:
  layers = [int(m.group(1)) for n in names if (m := _LORA_TENSOR.fullmatch(n))]
  if not layers:
    raise KeyError(f"{folder}: no LoRA tensors (like {tensor_name(0, 'q', 'A')!r})")
  return max(layers) + 1


def _target_shapes(f, folder: Path, config: LoRAConfig, n: int, model_config) -> dict:
  """{target: (D_in, D_out)}: the model's, or layer 0's; every layer's tensors checked."""
  dims = {}
  for t in config.targets:
    if model_config is not None:
      d_in, d_out = target_dims(model_config, t)
    else:
      d_in = f.shape(tensor_name(0, t, "A"))[-1]
      d_out = f.shape(tensor_name(0, t, "B"))[0]
    for i in range(n):
      for which, shape in (("A", (config.rank, d_in)), ("B", (d_out, config.rank))):
        name = tensor_name(i, t, which)
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
  cfg = read_config(folder)
  with open_adapter(folder) as f:
    names = set(f.keys())
    copies = copy_shapes(f, folder, model_config)
    lora_names = names - {EMBEDDING_KEYS[m] for m in copies}
    n = model_config.num_layers if model_config else _num_layers(lora_names, folder)
    vocab = next(iter(copies.values()))[0] if copies else None
    config = lora_config_from_peft(cfg, n, vocab)
    if model_config is not None:  # before the tensor names, which would blame the experts' keys
      check_targets(config.targets, model_config)
    want = {tensor_name(i, t, w) for i in range(n) for t in config.targets for w in "AB"}
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
        a[i] = f.read(tensor_name(i, t, "A")).astype(np.float32).T
        b[i] = f.read(tensor_name(i, t, "B")).astype(np.float32).T
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
      tensors[tensor_name(i, t, "A")] = np.ascontiguousarray(a[i].T)  # [R, D_in]
      tensors[tensor_name(i, t, "B")] = np.ascontiguousarray(b[i].T)  # [D_out, R]
  save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
  (folder / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
  return folder
