"""Hugging Face checkpoints (config.json + safetensors) -> psynth_jax `Params`.

Each supported family has one explicit name table, {our name: (HF name, quirk)},
where the quirk is a small named function that turns the HF tensor into our
layout and checks its HF shape first (a transposed weight can have the right
number of elements, so reshaping alone would not catch it). Stacked tensors (the
experts of a mixture-of-experts layer, [E, ...]) name a tuple of HF tensors, one
per expert, and their quirk stacks the list. Torch `Linear`
weights are [out, in], and so are ours, with heads split out, e.g.
q_proj.weight [N*H, D] -> attn.q [N, H, D] (the experts and the router of a
mixture-of-experts layer are [in, out]). RoPE uses the HF "rotate half"
layout on both sides, so q/k need no permutation. Every HF tensor must be
consumed; `params_from_flat` then checks every name and shape once more.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from psynth_jax.convert.hf_views import MOE_NAMES, expert_state, text_model_state
from psynth_jax.model.checkpoint import LazyArrays, read_json, read_safetensors
from psynth_jax.model.config import SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedModelError
from psynth_jax.model.transformer import Params, params_from_flat

Quirk = Callable[[np.ndarray, ModelConfig], np.ndarray]  # or a list of arrays, for a tuple
NameTable = dict[str, tuple[str | tuple[str, ...], Quirk]]

# HF tensors that carry no weights of their own (recomputed from the config).
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)


def _expect(w: np.ndarray, shape: tuple[int, ...]) -> None:
  if tuple(w.shape) != tuple(shape):
    raise ValueError(f"has shape {tuple(w.shape)}, expected {tuple(shape)}")


# --- layout quirks: HF tensor -> our layout ----------------------------------


def keep_vector(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """Norm scales: [D] or [H], same layout on both sides."""
  return w


def keep_embedding(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """embed_tokens.weight [V, D] is already ours."""
  _expect(w, (c.vocab_size, c.hidden_size))
  return w


def keep_lm_head(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """lm_head.weight [V, D] is already ours."""
  _expect(w, (c.vocab_size, c.hidden_size))
  return w


def q_proj_to_nhd(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """q_proj.weight [N*H, D] -> [N, H, D]."""
  _expect(w, (c.num_heads * c.head_dim, c.hidden_size))
  return w.reshape(c.num_heads, c.head_dim, c.hidden_size)


def kv_proj_to_ghd(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """k_proj/v_proj.weight [G*H, D] -> [G, H, D]."""
  _expect(w, (c.num_kv_heads * c.head_dim, c.hidden_size))
  return w.reshape(c.num_kv_heads, c.head_dim, c.hidden_size)


def o_proj_to_dnh(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """o_proj.weight [D, N*H] -> [D, N, H]."""
  _expect(w, (c.hidden_size, c.num_heads * c.head_dim))
  return w.reshape(c.hidden_size, c.num_heads, c.head_dim)


def q_bias_to_nh(b: np.ndarray, c: ModelConfig) -> np.ndarray:
  """q_proj.bias [N*H] -> [N, H]."""
  _expect(b, (c.num_heads * c.head_dim,))
  return b.reshape(c.num_heads, c.head_dim)


def kv_bias_to_gh(b: np.ndarray, c: ModelConfig) -> np.ndarray:
  """k_proj/v_proj.bias [G*H] -> [G, H]."""
  _expect(b, (c.num_kv_heads * c.head_dim,))
  return b.reshape(c.num_kv_heads, c.head_dim)


def keep_up_proj(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """gate_proj/up_proj.weight [F, D] is already ours."""
  _expect(w, (c.intermediate_size, c.hidden_size))
  return w


def keep_down_proj(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """down_proj.weight [D, F] is already ours."""
  _expect(w, (c.hidden_size, c.intermediate_size))
  return w


def router_to_de(w: np.ndarray, c: ModelConfig) -> np.ndarray:
  """Router gate.weight [E, D] -> [D, E]."""
  _expect(w, (c.num_experts, c.hidden_size))
  return w.T


def stack_up_projs(ws: list[np.ndarray], c: ModelConfig) -> np.ndarray:
  """E expert gate/up weights [F_E, D] (w1 / w3) -> [E, D, F_E]."""
  for w in ws:
    _expect(w, (c.moe_intermediate_size, c.hidden_size))
  return np.stack([w.T for w in ws])


def stack_down_projs(ws: list[np.ndarray], c: ModelConfig) -> np.ndarray:
  """E expert down weights [D, F_E] (w2) -> [E, F_E, D]."""
  for w in ws:
    _expect(w, (c.hidden_size, c.moe_intermediate_size))
  return np.stack([w.T for w in ws])


# --- name tables ---------------------------------------------------------------

LLAMA_LAYER: NameTable = {
  "attn_norm.scale": ("input_layernorm.weight", keep_vector),
  "mlp_norm.scale": ("post_attention_layernorm.weight", keep_vector),
  "attn.q": ("self_attn.q_proj.weight", q_proj_to_nhd),
  "attn.k": ("self_attn.k_proj.weight", kv_proj_to_ghd),
  "attn.v": ("self_attn.v_proj.weight", kv_proj_to_ghd),
  "attn.o": ("self_attn.o_proj.weight", o_proj_to_dnh),
  "mlp.gate": ("mlp.gate_proj.weight", keep_up_proj),
  "mlp.up": ("mlp.up_proj.weight", keep_up_proj),
  "mlp.down": ("mlp.down_proj.weight", keep_down_proj),
}
# Qwen2 (only) has q/k/v biases and no o_proj bias.
QKV_BIAS: NameTable = {
  "attn.q_bias": ("self_attn.q_proj.bias", q_bias_to_nh),
  "attn.k_bias": ("self_attn.k_proj.bias", kv_bias_to_gh),
  "attn.v_bias": ("self_attn.v_proj.bias", kv_bias_to_gh),
}
# Qwen3 RMS-normalises each query/key head before RoPE.
QK_NORM: NameTable = {
  "attn.q_norm.scale": ("self_attn.q_norm.weight", keep_vector),
  "attn.k_norm.scale": ("self_attn.k_norm.weight", keep_vector),
}


# Gemma 2/3: four norms per layer. HF's post_attention_layernorm is the attention
# *output* norm here (in Llama it is the pre-MLP norm): the table says which is which.
GEMMA_LAYER: NameTable = {
  "attn_norm.scale": ("input_layernorm.weight", keep_vector),
  "post_attn_norm.scale": ("post_attention_layernorm.weight", keep_vector),
  "mlp_norm.scale": ("pre_feedforward_layernorm.weight", keep_vector),
  "post_mlp_norm.scale": ("post_feedforward_layernorm.weight", keep_vector),
  **{k: v for k, v in LLAMA_LAYER.items() if not k.endswith("norm.scale")},
}


ATTENTION_AND_NORMS = {k: v for k, v in LLAMA_LAYER.items() if not k.startswith("mlp.")}


def moe_layer(c: ModelConfig) -> NameTable:
  """An expert layer's router and stacked experts, under `c`'s family's names."""
  block, gate, up, down = MOE_NAMES[c.model_type]
  experts = range(c.num_experts)

  def each(proj: str) -> tuple[str, ...]:
    return tuple(f"{block}.experts.{e}.{proj}.weight" for e in experts)

  return {
    "mlp.router": (f"{block}.gate.weight", router_to_de),
    "mlp.experts.gate": (each(gate), stack_up_projs),
    "mlp.experts.up": (each(up), stack_up_projs),
    "mlp.experts.down": (each(down), stack_down_projs),
  }


def _no_attention_bias(c: ModelConfig) -> None:
  # In Llama/Mistral/Qwen3, attention_bias=True also biases o_proj, which we lack.
  if c.qkv_bias:
    raise UnsupportedModelError(
      f"{c.model_type} with attention_bias=True (q/k/v/o_proj biases) is not supported"
    )


def llama_table(c: ModelConfig) -> NameTable:
  """Llama and Mistral (identical tensor names)."""
  _no_attention_bias(c)
  return _full_table(c, LLAMA_LAYER)


def qwen2_table(c: ModelConfig) -> NameTable:
  """Llama's names plus q/k/v biases."""
  return _full_table(c, {**LLAMA_LAYER, **QKV_BIAS})


def qwen3_table(c: ModelConfig) -> NameTable:
  """Llama's names plus per-head q/k RMSNorm."""
  _no_attention_bias(c)
  return _full_table(c, {**LLAMA_LAYER, **QK_NORM})


def gemma2_table(c: ModelConfig) -> NameTable:
  """Gemma 2: pre- and post-norms around attention and MLP."""
  return _full_table(c, GEMMA_LAYER)


def gemma3_table(c: ModelConfig) -> NameTable:
  """Gemma 3: Gemma 2's names plus per-head q/k RMSNorm."""
  return _full_table(c, {**GEMMA_LAYER, **QK_NORM})


def mixtral_table(c: ModelConfig) -> NameTable:
  """Mistral's attention; every layer's MLP is a mixture of experts."""
  _no_attention_bias(c)
  return _full_table(c, LLAMA_LAYER, {**ATTENTION_AND_NORMS, **moe_layer(c)})


def qwen3_moe_table(c: ModelConfig) -> NameTable:
  """Qwen3's attention; expert layers (`c.moe_layers`) and dense ones (Llama's MLP names)."""
  _no_attention_bias(c)
  return _full_table(
    c, {**LLAMA_LAYER, **QK_NORM}, {**ATTENTION_AND_NORMS, **QK_NORM, **moe_layer(c)}
  )


FAMILY_TABLES: dict[str, Callable[[ModelConfig], NameTable]] = {
  "llama": llama_table,
  "mistral": llama_table,
  "qwen2": qwen2_table,
  "qwen3": qwen3_table,
  "gemma2": gemma2_table,
  "gemma3_text": gemma3_table,
  "mixtral": mixtral_table,
  "qwen3_moe": qwen3_moe_table,
}


def _full_table(
  c: ModelConfig, layer: NameTable, expert_layer: NameTable | None = None
) -> NameTable:
  table: NameTable = {
    "embed.embedding": ("model.embed_tokens.weight", keep_embedding),
    "final_norm.scale": ("model.norm.weight", keep_vector),
  }
  if not c.tie_word_embeddings:
    table["lm_head"] = ("lm_head.weight", keep_lm_head)
  for i in range(c.num_layers):
    entries = expert_layer if c.is_moe(i) else layer
    for ours, (theirs, quirk) in entries.items():
      if isinstance(theirs, tuple):
        table[f"layers.{i}.{ours}"] = (tuple(f"model.layers.{i}.{t}" for t in theirs), quirk)
      else:
        table[f"layers.{i}.{ours}"] = (f"model.layers.{i}.{theirs}", quirk)
  return table


def hf_names(entry: str | tuple[str, ...]) -> tuple[str, ...]:
  """The HF tensor names of one table entry (one, or one per expert)."""
  return entry if isinstance(entry, tuple) else (entry,)


def name_table(config: ModelConfig) -> NameTable:
  """{our name: (HF name, quirk)} for every parameter of `config`'s model."""
  if config.model_type not in FAMILY_TABLES:
    raise UnsupportedModelError(
      f"no conversion table for model_type {config.model_type!r}; supported:"
      f" {SUPPORTED_MODEL_TYPES}"
    )
  return FAMILY_TABLES[config.model_type](config)


# --- conversion ------------------------------------------------------------------


def hf_state_to_flat(
  config: ModelConfig, state: Mapping[str, np.ndarray], source: str = "HF checkpoint"
) -> LazyArrays:
  """Renames and re-lays out an HF state dict into our flat parameter names.

  Args:
    config: the model's config (from `ModelConfig.from_hf`).
    state: HF tensor name -> numpy array (any float dtype; not cast here); a
      lazy mapping (`read_safetensors`) is read one tensor at a time.
    source: what to call the checkpoint in error messages.

  Returns:
    {our name: array}, ready for `params_from_flat`; each array is read and
    converted when it is looked up.

  Raises:
    KeyError: HF tensors are missing or left over (all are named), at once.
    ValueError: an HF tensor has the wrong shape (names it), when it is read.
  """
  table = name_table(config)
  state = expert_state(config, text_model_state(config, state))
  used = {name for theirs, _ in table.values() for name in hf_names(theirs)}
  missing = sorted(name for name in used if name not in state)
  leftover = sorted(k for k in state if k not in used and not _ignorable(k, config))
  if missing or leftover:
    raise KeyError(
      f"{source} does not match a {config.model_type} model with {config.num_layers}"
      f" layers: missing HF tensors {_some(missing)}, unused HF tensors {_some(leftover)}"
    )

  def convert(ours: str, theirs, quirk: Quirk) -> np.ndarray:
    try:
      if isinstance(theirs, tuple):  # stacked: one tensor per expert
        return quirk([np.asarray(state[t]) for t in theirs], config)
      return quirk(np.asarray(state[theirs]), config)
    except ValueError as e:
      raise ValueError(f"{source}: HF tensor {theirs!r} (-> {ours!r}) {e}") from None

  return LazyArrays(
    {ours: functools.partial(convert, ours, *entry) for ours, entry in table.items()}
  )


def _some(names: list[str], most: int = 24) -> str:
  """The names, or the first `most` and a count (a 128-expert model misses thousands)."""
  if len(names) <= most:
    return str(names)
  return f"{names[:most]} and {len(names) - most} more"


def _ignorable(name: str, config: ModelConfig) -> bool:
  if name.endswith(HARMLESS_SUFFIXES):
    return True
  # A tied checkpoint may still store the head; it is the embedding by definition.
  return config.tie_word_embeddings and name == "lm_head.weight"


def safetensors_files(folder: Path) -> list[Path]:
  """The folder's weight files: from model.safetensors.index.json, else every *.safetensors."""
  index = folder / "model.safetensors.index.json"
  if index.exists():
    weight_map = read_json(index)["weight_map"]
    files = [folder / name for name in sorted(set(weight_map.values()))]
    absent = [str(f) for f in files if not f.exists()]
    if absent:
      raise FileNotFoundError(f"{index} names shards that do not exist: {absent}")
    return files
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no *.safetensors files in {folder}")
  return files


def load_hf_folder(path: str | Path, dtype: str | None = None, mesh=None, rules=None) -> Params:
  """Loads an HF model folder (config.json + single or sharded safetensors).

  Args:
    path: the folder.
    dtype: "float32" | "bfloat16"; default: the checkpoint's own dtype.
    mesh: place each tensor straight into its `NamedSharding` on this mesh
      (`psynth_jax.sharding`; logical-axis `rules`, default DEFAULT_RULES).

  Returns:
    `Params` with every tensor converted and shape-checked; the files are read
    one tensor at a time.
  """
  folder = Path(path)
  config_path = folder / "config.json"
  config = ModelConfig.from_hf(read_json(config_path), dtype=dtype, source=str(config_path))
  state = read_safetensors(safetensors_files(folder))
  flat = hf_state_to_flat(config, state, source=str(folder))
  return params_from_flat(config, flat, str(folder), mesh, rules)
