"""Adapter folders of every kind -> (Mapper, LoRAWeights): the release's, PEFT's and ours.

The reference release (Graph-COM/Parallel-Synthesis) is one folder holding

  judger_lora/               the synthesizer's LoRA as a PEFT adapter; the published
                             one also holds bf16 copies of embed_tokens / lm_head for
                             its vocabulary resized to 151,669 ids
  cache_mapper.pt            the mapper's torch state dict
  cache_mapper_config.json   {"hidden_dim": 32, "metadata_features": "both"}

or the same one level down, in `latest/` or `step_checkpoints/latest/` (a training
run's folder), as the reference's own resolver looks. Either part may be missing
(a LoRA-only or mapper-only run). `load_adapter` takes that, a PEFT folder
(`adapter_config.json`) or one of our trainer exports (`mapper/` + `lora/`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RELEASE_LORA = "judger_lora"
RELEASE_MAPPER = "cache_mapper.pt"
_RUN_SUBFOLDERS = ("latest", os.path.join("step_checkpoints", "latest"))


def _has_release_parts(folder: Path) -> bool:
  return (folder / RELEASE_MAPPER).is_file() or (folder / RELEASE_LORA).is_dir()


def release_root(folder: str | os.PathLike) -> Path | None:
  """The folder holding the release's parts (itself or a run's `latest/`), or None."""
  folder = Path(folder).expanduser()
  for candidate in (folder, *(folder / sub for sub in _RUN_SUBFOLDERS)):
    if candidate.is_dir() and _has_release_parts(candidate):
      return candidate
  return None


def load_release(folder: str | os.PathLike, *, lm=None, embeddings: str = "check"):
  """(Mapper or None, LoRAWeights or None) of a reference-release folder (see the top).

  Args:
    folder: the release folder (or a training run's folder with `latest/`).
    lm: optional: the base `LanguageModel`, to check the mapper's and the LoRA's
      shapes against it now and the LoRA's embedding copies against its rows.
    embeddings: what to do with the LoRA's embedding copies ("check" | "ignore"),
      as in `psynth_jax.load_peft_lora`.

  Raises:
    FileNotFoundError: neither `judger_lora/` nor `cache_mapper.pt` is there.
  """
  from psynth_jax.convert.peft import load_peft_lora
  from psynth_jax.convert.reference import load_reference_mapper
  from psynth_jax.mapper import check_mapper
  from psynth_jax.model.lora import check_lora

  root = release_root(folder)
  if root is None:
    raise FileNotFoundError(
      f"{folder} is not a release folder: no {RELEASE_LORA}/ or {RELEASE_MAPPER} in it or in"
      f" {' or '.join(_RUN_SUBFOLDERS)}"
    )
  mapper = lora = None
  if (root / RELEASE_MAPPER).is_file():
    mapper = load_reference_mapper(root / RELEASE_MAPPER)
  if (root / RELEASE_LORA).is_dir():
    lora = load_peft_lora(root / RELEASE_LORA, lm=lm, embeddings=embeddings)
  if lm is not None:
    check_mapper(mapper, lm.config.num_layers)
    check_lora(lora, lm.config)
  return mapper, lora


def save_release(folder: str | os.PathLike, mapper=None, lora=None, base_model: str = "") -> Path:
  """Writes a mapper and / or a LoRA in the release's layout (what `load_release` reads)."""
  from psynth_jax.convert.peft import export_peft_lora
  from psynth_jax.convert.reference import save_reference_mapper

  if mapper is None and lora is None:
    raise ValueError("save_release needs a mapper, a LoRA or both")
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if mapper is not None and not mapper.is_identity:
    save_reference_mapper(mapper, folder / RELEASE_MAPPER)
  if lora is not None:
    export_peft_lora(lora, folder / RELEASE_LORA, base_model)
  return folder


def load_adapter(
  folder: str | os.PathLike, lm=None, *, embeddings: str = "check", synthesizer: str = "cache"
) -> Any:
  """(Mapper or None, LoRAWeights or None) of any adapter folder psynth_jax reads.

  Args:
    folder: one of our trainer exports (`mapper/mapper_config.json` + `lora/`), a
      PEFT LoRA folder (`adapter_config.json`), or a reference-release folder
      (`judger_lora/` and / or `cache_mapper.pt`, see the top).
    lm: optional: the base `LanguageModel`; with it, shapes are checked now (a
      trainer export needs it: its mapper records the layer count it was made for).
    embeddings: a PEFT / release LoRA's embedding copies: "check" | "ignore".
    synthesizer: what will run it, "cache" (Parallel-Synthesis) or "text" (`train.path`);
      a trainer export made for the other is refused, a release folder is cache-only.
  """
  from psynth_jax.convert.peft import CONFIG_FILE, load_peft_lora

  path = Path(folder).expanduser()
  if (path / "mapper" / "mapper_config.json").is_file():
    from psynth_jax.train.checkpoints import load_export

    if lm is None:
      raise ValueError(f"{path} is a trainer export: pass the base model (lm=) to load it")
    return load_export(path, lm.config, synthesizer)
  if (path / CONFIG_FILE).is_file():
    return None, load_peft_lora(path, lm=lm, embeddings=embeddings)
  if release_root(path) is not None:
    if synthesizer != "cache":
      raise ValueError(f"{path} is a Parallel-Synthesis release: it runs the cache synthesizer")
    return load_release(path, lm=lm, embeddings=embeddings)
  raise FileNotFoundError(
    f"{path} is not an adapter: expected a trainer export (mapper/mapper_config.json), a PEFT"
    f" folder ({CONFIG_FILE}) or a release folder ({RELEASE_LORA}/ and / or {RELEASE_MAPPER})"
  )
