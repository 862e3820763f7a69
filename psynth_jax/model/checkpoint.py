"""The native checkpoint: a converted-model folder (what `psynth convert` writes).

A converted folder holds:
  psynth_config.json   `ModelConfig.to_dict()`
  model.safetensors    our flat parameter names (`flat_state`), in the config's
                       dtype (bfloat16 stored as bfloat16); its metadata names the
                       layout ("layout": "out_in"). A folder without one was written
                       with the projections [in, out]: it is read and transposed.
  tokenizer.json, tokenizer_config.json, special_tokens_map.json,
  chat_template.jinja, generation_config.json   whichever the source had

psynth_config.json is written last, so a folder that has it is complete.
`psynth_jax.load_pretrained` also reads HF folders and .gguf files (`psynth_jax.convert`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from psynth_jax.model.config import ModelConfig
from psynth_jax.model.fingerprint import first_layout_axes
from psynth_jax.model.transformer import Params, flat_state, params_from_flat

CONFIG_FILE = "psynth_config.json"
WEIGHTS_FILE = "model.safetensors"
LAYOUT = "out_in"  # projections stored [out, in] (`psynth_jax.model.layers.MLP`)
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
  safetensors.numpy.save_file(arrays, str(tmp), metadata={"format": "psynth_jax", "layout": LAYOUT})
  os.replace(tmp, out / WEIGHTS_FILE)
  _write_text(out / CONFIG_FILE, json.dumps(params.config.to_dict(), indent=2) + "\n")
  return out


def _write_text(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def load_converted(path: str | Path, dtype: str | None = None, mesh=None, rules=None) -> Params:
  """Loads a folder written by `save_converted`.

  Args:
    path: the folder.
    dtype: "float32" | "bfloat16"; default: the dtype it was saved in.
    mesh: place each tensor straight into its `NamedSharding` on this mesh
      (`psynth_jax.sharding`; logical-axis `rules`, default DEFAULT_RULES).
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
  arrays = read_safetensors([weights])
  with _open(weights) as reader:
    layout = (reader.metadata() or {}).get("layout")
  if layout is None:
    arrays = first_layout(arrays)
  elif layout != LAYOUT:
    raise ValueError(f"{weights}: unknown layout {layout!r} (this psynth_jax reads {LAYOUT!r})")
  return params_from_flat(config, arrays, str(weights), mesh, rules)


def first_layout(arrays: Mapping[str, np.ndarray]) -> LazyArrays:
  """The tensors of a folder converted with the projections [in, out], in today's layout."""

  def make(name):
    axes = first_layout_axes(name)
    if axes is None:
      return lambda: arrays[name]
    return lambda: np.ascontiguousarray(arrays[name].transpose(np.argsort(axes)))

  return LazyArrays({name: make(name) for name in arrays})


def read_json(path: Path) -> dict:
  try:
    return json.loads(Path(path).read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"missing file {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_safetensors(files: list[Path]) -> TensorFiles:
  """The tensors of the given files by name, each read when it is looked up (see below)."""
  return TensorFiles(files)


class TensorFiles(Mapping[str, np.ndarray]):
  """The tensors of safetensors files by name; a lookup reads that one tensor from disk.

  Only the headers (names, shapes) are read up front. A lookup memory-maps the
  tensor's file, copies the tensor out (bf16 as `ml_dtypes.bfloat16`) and unmaps
  it, so a checkpoint read tensor by tensor never holds more than one tensor in
  host memory, whatever the size of the files.
  """

  def __init__(self, files: list[Path]):
    self._where: dict[str, Path] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
      with _open(f) as reader:
        for name in reader.keys():
          if name in self._where:
            raise ValueError(f"{f}: tensor {name!r} also appears in {self._where[name]}")
          self._where[name] = Path(f)
          self._shapes[name] = tuple(reader.get_slice(name).get_shape())

  def __getitem__(self, name: str) -> np.ndarray:
    f = self._where[name]
    with _open(f) as reader:
      try:
        return reader.get_tensor(name)
      except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot read tensor {name!r} of {f}: {e}") from e

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    """A tensor's shape, from the header (nothing is read)."""
    return self._shapes[name]

  def rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor: only those bytes are read."""
    f = self._where[name]
    with _open(f) as reader:
      try:
        return reader.get_slice(name)[start:stop]
      except (OSError, SafetensorError) as e:
        raise ValueError(f"cannot read rows of tensor {name!r} of {f}: {e}") from e


@contextlib.contextmanager
def _open(f: Path):
  try:
    with safe_open(str(f), framework="numpy") as reader:
      yield reader
  except FileNotFoundError:
    raise FileNotFoundError(f"missing safetensors file {f}") from None
  except SafetensorError as e:
    raise ValueError(f"cannot read safetensors file {f}: {e}") from e


class LazyArrays(Mapping[str, np.ndarray]):
  """{name: array} whose arrays are made when looked up, from {name: zero-argument function}.

  Converters return one (e.g. HF names and layouts -> ours) so that loading
  converts one tensor at a time instead of holding a second copy of the model.
  """

  def __init__(self, makers: dict[str, Callable[[], np.ndarray]]):
    self._makers = makers

  def __getitem__(self, name: str) -> np.ndarray:
    return self._makers[name]()

  def __iter__(self) -> Iterator[str]:
    return iter(self._makers)

  def __len__(self) -> int:
    return len(self._makers)
