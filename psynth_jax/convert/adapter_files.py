"""A PEFT adapter folder's layout, and its weights read one tensor (or row chunk) at a time.

`open_adapter(folder)` opens `adapter_model.safetensors` (read tensor by
tensor, memory-mapped, through `model.checkpoint.TensorFiles`), else a legacy `adapter_model.bin` through `torch.load(...,
weights_only=True, mmap=True)`. Names and shapes come from the headers, so a
caller checks the key set before reading any data; `read` returns one tensor
and `rows` a row range of one, both in the file's own dtype (bf16 as
`ml_dtypes.bfloat16`), so a 3 GB embedding copy is never held whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from psynth_jax.model.checkpoint import TensorFiles

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the *ForCausalLM model
# Full copies PEFT may store (save_embedding_layers, modules_to_save): module -> tensor name.
EMBEDDING_KEYS = {
  "embed_tokens": f"{PREFIX}model.embed_tokens.weight",
  "lm_head": f"{PREFIX}lm_head.weight",
}


class SafetensorsFile:
  """The adapter's safetensors file (`model.checkpoint.TensorFiles`), float tensors only."""

  def __init__(self, path: Path):
    self.path, self._files = path, TensorFiles([path])

  def keys(self) -> list[str]:
    return list(self._files)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files.shape(name)

  def read(self, name: str) -> np.ndarray:
    """One whole tensor in its own dtype."""
    return float_tensor(self.path, name, self._files[name])

  def rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor in its own dtype (only those bytes are read)."""
    return float_tensor(self.path, name, self._files.rows(name, start, stop))


class TorchFile:
  """A legacy `adapter_model.bin` (a torch state dict), memory-mapped where torch can."""

  def __init__(self, path: Path, state: dict):
    self.path, self._state = path, state

  def keys(self) -> list[str]:
    return list(self._state)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._state[name].shape)

  def read(self, name: str) -> np.ndarray:
    return self._numpy(name, self._state[name])

  def rows(self, name: str, start: int, stop: int) -> np.ndarray:
    return self._numpy(name, self._state[name][start:stop])

  def _numpy(self, name: str, t) -> np.ndarray:
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
      return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return float_tensor(self.path, name, t.numpy())


AdapterFile = SafetensorsFile | TorchFile


def float_tensor(path: Path, name: str, x: np.ndarray) -> np.ndarray:
  """`x`, after checking that it is a float tensor (bf16 included)."""
  if not np.issubdtype(x.dtype, np.floating) and x.dtype != ml_dtypes.bfloat16:
    raise ValueError(f"{path}: tensor {name!r} has dtype {x.dtype}, not a float type")
  return x


@contextlib.contextmanager
def open_adapter(folder: Path) -> Iterator[AdapterFile]:
  """The adapter's weights file (safetensors, else a legacy .bin), opened lazily."""
  path = folder / WEIGHTS_FILE
  if path.exists():
    yield SafetensorsFile(path)
    return
  legacy = folder / LEGACY_WEIGHTS_FILE
  if not legacy.exists():
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS_FILE} nor {LEGACY_WEIGHTS_FILE}")
  import torch

  try:  # mmap needs torch's zip format (the default since torch 1.6)
    state = torch.load(legacy, map_location="cpu", weights_only=True, mmap=True)
  except RuntimeError:
    state = torch.load(legacy, map_location="cpu", weights_only=True)
  yield TorchFile(legacy, state)
