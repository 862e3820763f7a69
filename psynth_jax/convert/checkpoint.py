"""The converted-model folder, and one loader for every weight source.

A converted folder holds:
  psynth_config.json   `ModelConfig.to_dict()`
  model.safetensors    our flat parameter names (`flat_state`), in the config's
                       dtype (bfloat16 stored as bfloat16)
  tokenizer.json, tokenizer_config.json, special_tokens_map.json,
  chat_template.jinja, generation_config.json   whichever the source had

psynth_config.json is written last, so a folder that has it is complete.
`load_params` accepts a converted folder, an HF folder or a .gguf file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from psynth_jax.convert.hf import load_hf_folder, read_json, read_safetensors
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import Params, flat_state, params_from_flat

CONFIG_FILE = "psynth_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "chat_template.jinja",
  "generation_config.json",
)


def save_converted(
  params: Params,
  out_dir: str | Path,
  tokenizer_src: str | Path | None = None,
  generation_config: dict[str, Any] | None = None,
) -> Path:
  """Writes params (and the tokenizer files of `tokenizer_src`) as a converted folder.

  Args:
    params: the weights to save.
    out_dir: the folder (created if needed; existing files are replaced).
    tokenizer_src: a folder to copy `TOKENIZER_FILES` from (those it has).
    generation_config: written as generation_config.json, replacing a copied one.

  Returns:
    out_dir as a Path.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / CONFIG_FILE).unlink(missing_ok=True)  # the folder is incomplete until the end
  if tokenizer_src is not None:
    for name in TOKENIZER_FILES:
      src = Path(tokenizer_src) / name
      if src.is_file():
        shutil.copyfile(src, out / name)
  if generation_config is not None:
    _write_text(out / "generation_config.json", json.dumps(generation_config, indent=2) + "\n")
  arrays = {name: np.asarray(value) for name, value in flat_state(params).items()}
  tmp = out / (WEIGHTS_FILE + ".tmp")
  safetensors.numpy.save_file(arrays, str(tmp), metadata={"format": "psynth_jax"})
  os.replace(tmp, out / WEIGHTS_FILE)
  _write_text(out / CONFIG_FILE, json.dumps(params.config.to_dict(), indent=2) + "\n")
  return out


def _write_text(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def load_converted(path: str | Path, dtype: str | None = None) -> Params:
  """Loads a folder written by `save_converted`.

  Args:
    path: the folder.
    dtype: "float32" | "bfloat16"; default: the dtype it was saved in.
  """
  folder = Path(path)
  try:
    config = ModelConfig.from_dict(read_json(folder / CONFIG_FILE))
  except TypeError as e:
    raise ValueError(f"{folder / CONFIG_FILE} is not a psynth_jax config: {e}") from None
  if dtype is not None:
    config = config.replace(dtype=dtype)
  weights = folder / WEIGHTS_FILE
  if not weights.is_file():
    raise FileNotFoundError(f"missing weights file {weights}")
  return params_from_flat(config, read_safetensors([weights]), source=str(weights))


def load_params(path: str | Path, dtype: str | None = None) -> Params:
  """Loads weights from a converted folder, an HF folder or a .gguf file.

  Args:
    path: a folder with psynth_config.json (converted), a folder with
      config.json (Hugging Face safetensors), or a .gguf file.
    dtype: "float32" | "bfloat16"; default: the source's own dtype.
  """
  path = Path(path).expanduser()
  if path.is_dir():
    if (path / CONFIG_FILE).is_file():
      return load_converted(path, dtype)
    if (path / "config.json").is_file():
      return load_hf_folder(path, dtype)
    raise FileNotFoundError(
      f"{path} has neither {CONFIG_FILE} (converted) nor config.json (Hugging Face)"
    )
  if path.suffix == ".gguf":
    from psynth_jax.convert.gguf import load_gguf

    return load_gguf(path, dtype)[0]
  if not path.exists():
    raise FileNotFoundError(f"no model at {path}")
  raise ValueError(f"{path}: expected a model folder or a .gguf file")
