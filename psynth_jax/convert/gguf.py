"""GGUF files -> psynth_jax `Params`, through transformers' GGUF reader.

transformers dequantises every tensor to float32 and maps llama.cpp names to
HF names, undoing llama.cpp's q/k row permutation for the llama architecture
(llama.cpp stores q/k in an interleaved-RoPE order; HF and we use "rotate
half"). We then convert from the torch model's state dict with the HF name
tables, rather than via `save_pretrained`, which refuses GGUF-loaded models.
torch and transformers are imported lazily: only this path needs them.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from psynth_jax.convert.hf import hf_state_to_flat
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import Params, params_from_flat


def _split(file: str | Path) -> tuple[Path, str]:
  path = Path(file)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file {path} does not exist")
  return path.parent, path.name


def load_gguf_torch(file: str | Path):
  """The transformers (PyTorch, float32) model stored in a GGUF file."""
  import torch
  from transformers import AutoModelForCausalLM

  folder, name = _split(file)
  try:
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"transformers cannot load GGUF file {Path(file)}: {e}") from e


def load_gguf(
  file: str | Path, dtype: str | None = None, mesh=None, rules=None
) -> tuple[Params, dict[str, Any]]:
  """Loads a GGUF model (any quantisation transformers can dequantise).

  Args:
    file: the .gguf file.
    dtype: "float32" | "bfloat16"; default float32 (transformers' dequantised dtype).
    mesh: place each tensor into its `NamedSharding` on this mesh
      (`psynth_jax.sharding`; logical-axis `rules`, default DEFAULT_RULES).
      (transformers dequantises the whole file in host memory first).

  Returns:
    (params, hf_config_dict): our weights and the HF config transformers derived
    from the GGUF metadata (`ModelConfig.from_hf` of it gave `params.config`).
  """
  model = load_gguf_torch(file)
  hf_config = model.config.to_dict()
  config = ModelConfig.from_hf(hf_config, dtype=dtype or "float32", source=str(file))
  # .numpy() shares memory with the torch tensors; params_from_flat makes the copy.
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  flat = hf_state_to_flat(config, state, source=str(file))
  params = params_from_flat(config, flat, str(file), mesh, rules)
  del model, state, flat
  gc.collect()
  return params, hf_config


def export_gguf_tokenizer(file: str | Path, out_dir: str | Path) -> Path:
  """Writes the GGUF file's tokenizer (tokenizer.json, config, chat template) to out_dir."""
  from transformers import AutoTokenizer

  folder, name = _split(file)
  tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  out = Path(out_dir)
  tokenizer.save_pretrained(out)
  return out


def generation_config_from_hf(hf_config: dict[str, Any]) -> dict[str, Any]:
  """The bos/eos/pad ids a GGUF's HF config carries, as a generation_config.json dict."""
  keys = ("bos_token_id", "eos_token_id", "pad_token_id")
  return {k: hf_config[k] for k in keys if hf_config.get(k) is not None}


def convert_gguf(
  file: str | Path,
  out_dir: str | Path,
  dtype: str | None = None,
  generation_config: dict[str, Any] | None = None,
  chat_template: str | None = None,
) -> Path:
  """GGUF file -> converted folder (see `psynth_jax.model.checkpoint`).

  Args:
    file: the .gguf file.
    out_dir: the converted folder to write.
    dtype: "float32" | "bfloat16"; default float32.
    generation_config: generation_config.json contents; default: the GGUF's
      bos/eos/pad ids (a GGUF holds one eos id; chat models may need more).
    chat_template: written as chat_template.jinja (it takes precedence over a
      template the GGUF's tokenizer config holds); None: the GGUF's own, if any.
  """
  import tempfile

  from psynth_jax.model.checkpoint import save_converted

  params, hf_config = load_gguf(file, dtype)
  with tempfile.TemporaryDirectory() as tmp:
    export_gguf_tokenizer(file, tmp)
    if chat_template is not None:
      (Path(tmp) / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    save_converted(
      params,
      out_dir,
      tokenizer_src=tmp,
      generation_config=generation_config or generation_config_from_hf(hf_config),
    )
  return Path(out_dir)
