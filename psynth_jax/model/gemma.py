"""Gemma 2 and Gemma 3 (text) configs: what differs from Llama, read from `config.json`.

The decoder (`transformer.Block`) is Llama's with these switches (`ModelConfig`):

* GeGLU MLP: down(gelu_tanh(gate(x)) * up(x)) (`mlp_activation="gelu_tanh"`);
* RMSNorm scaled by (1 + w), multiplied in float32 before the cast
  (`norm_plus_one`); also on the per-head q/k norms of Gemma 3 (`qk_norm`);
* a norm on each sublayer's output before the residual add (`post_norms`): HF's
  `post_attention_layernorm` is that output norm here, not the pre-MLP norm
  (`pre_feedforward_layernorm`) it names in Llama;
* embeddings times sqrt(D), rounded to the parameter dtype as HF does
  (`embed_scale`); the tied unembedding is not scaled;
* attention scale query_pre_attn_scalar**-0.5 instead of head_dim**-0.5;
* local (sliding-window) and global layers from `layer_types`, or from the older
  `sliding_window_pattern` (Gemma 3: every 6th layer global) / alternation
  (Gemma 2: even layers local);
* Gemma 3: two RoPE bases, local layers `rope_local_base_freq` (v4 schema) or
  `rope_parameters["sliding_attention"]` (v5), global layers `rope_theta` with
  their linear scaling where set. Re-encoding a branch rotates each layer's keys
  with that layer's own table (`psynth_jax.merge`).
* Gemma 2: attention-score and final-logit soft-capping, cap * tanh(s / cap).

Soft-capping and the cache mapper: the mapper scales branch keys by alpha_k, which
without a cap multiplies every score q.k of a branch row by alpha_k (an inverse
temperature on that branch). Under attention soft-capping the score is squashed
after that product, cap * tanh(alpha_k q.k / cap): alpha_k still acts as a
temperature on small scores (|q.k| << cap, tanh ~ linear) but its effect on large
scores saturates, so it can no longer sharpen or flatten a branch's strongest
matches; beta_k's shift (beta_k * sum(q)) is squashed the same way. Values, and so
alpha_v / beta_v, are not capped.

Refused by name: bidirectional attention, a local RoPE with scaling, Gemma 3 with
`attn_logit_softcapping` (transformers ignores it for Gemma 3: we would not match),
any activation but the tanh-approximated gelu, and attention biases.
"""

from __future__ import annotations

from typing import Any

# HF's defaults when a config.json leaves a key out (Gemma2Config / Gemma3TextConfig).
_DEFAULTS = {
  "gemma2": dict(
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    rope_theta=10000.0,
  ),
  "gemma3_text": dict(
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    sliding_window_pattern=6,
  ),
}
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")  # names of one function in HF
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")


def text_part(hf: dict[str, Any]) -> dict[str, Any]:
  """A `gemma3` (multimodal) config's text config, inheriting its dtype and tying."""
  if hf.get("model_type") != "gemma3":
    return hf
  text = hf.get("text_config")
  if not isinstance(text, dict):
    raise KeyError("a gemma3 config.json without a text_config: psynth_jax reads only the text")
  inherited = {k: hf[k] for k in ("dtype", "torch_dtype", "tie_word_embeddings") if k in hf}
  return {"model_type": "gemma3_text", **inherited, **text}


def gemma_from_hf(hf: dict[str, Any], dtype: str | None, source: str) -> dict[str, Any]:
  """`ModelConfig` fields of a gemma2 / gemma3_text / gemma3 (text part) config dict.

  Raises:
    UnsupportedModelError: an option we do not implement (named).
    KeyError: a required key is missing (names `source` and the keys).
  """
  from psynth_jax.model.config import UnsupportedModelError, hf_dtype, rope_from_params

  hf = text_part(hf)
  model_type = hf["model_type"]
  d = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
  for key in ("attn_logit_softcapping", "final_logit_softcapping"):
    d[key] = hf.get(key, _DEFAULTS[model_type][key])  # an explicit null turns a cap off
  missing = [k for k in REQUIRED if k not in d]
  if missing:
    raise KeyError(f"{source} ({model_type}) is missing required key(s) {missing}")
  act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in GELU_TANH:
    raise UnsupportedModelError(f"{model_type} with activation {act!r} (only gelu_pytorch_tanh)")
  if d.get("attention_bias"):
    raise UnsupportedModelError(f"{model_type} with attention_bias=True is not supported")
  if d.get("use_bidirectional_attention"):
    raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention=True")
  if model_type == "gemma3_text" and d["attn_logit_softcapping"] is not None:
    raise UnsupportedModelError(
      "gemma3_text with attn_logit_softcapping set: transformers ignores it for Gemma 3,"
      " so no reference fixes what it should do"
    )
  layers = d["num_hidden_layers"]
  layer_types = d.get("layer_types")
  unknown = sorted(set(layer_types or ()) - {"full_attention", "sliding_attention"})
  if unknown:
    raise UnsupportedModelError(f"{model_type} with layer_types {unknown} is not supported")
  if layer_types is None and model_type == "gemma2":
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
  elif layer_types is None:
    pattern = d["sliding_window_pattern"]
    layer_types = [
      "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
    ]
  rope_theta, rope_scaling, local_theta = _gemma_rope(d, model_type, rope_from_params)
  num_heads = d.get("num_attention_heads", 8)
  return dict(
    model_type=model_type,
    vocab_size=d["vocab_size"],
    hidden_size=d["hidden_size"],
    intermediate_size=d["intermediate_size"],
    num_layers=layers,
    num_heads=num_heads,
    num_kv_heads=d.get("num_key_value_heads") or num_heads,
    head_dim=d["head_dim"],
    rms_norm_eps=d.get("rms_norm_eps", 1e-6),
    rope_theta=rope_theta,
    rope_scaling=rope_scaling,
    tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
    qk_norm=model_type == "gemma3_text",
    max_position_embeddings=d.get("max_position_embeddings", 8192),
    sliding_window=d["sliding_window"],
    dtype=hf_dtype(hf, dtype),
    layer_types=tuple(layer_types),
    rope_local_theta=local_theta,
    mlp_activation="gelu_tanh",
    norm_plus_one=True,
    post_norms=True,
    embed_scale=True,
    query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
    attn_softcap=_cap(d["attn_logit_softcapping"]),
    final_softcap=_cap(d["final_logit_softcapping"]),
  )


def _cap(value) -> float | None:
  return None if value is None else float(value)


def _gemma_rope(d: dict[str, Any], model_type: str, rope_from_params):
  """(global theta, global scaling, local theta or None) from either schema."""
  from psynth_jax.model.config import UnsupportedModelError

  params = d.get("rope_parameters")
  if model_type == "gemma2":  # one table for every layer, like Llama's
    params = params or {**(d.get("rope_scaling") or {}), "rope_theta": d["rope_theta"]}
    return (*rope_from_params(params, d["rope_theta"]), None)
  if params is not None and "full_attention" in params:  # v5: one dict per layer type
    theta, scaling = rope_from_params(params["full_attention"], d["rope_theta"])
    local = params.get("sliding_attention") or {}
    local_theta, local_scaling = rope_from_params(local, d["rope_local_base_freq"])
  else:  # v4: rope_theta / rope_scaling are the global layers', rope_local_base_freq the local
    theta, scaling = rope_from_params(params or d.get("rope_scaling") or {}, d["rope_theta"])
    local_theta, local_scaling = d["rope_local_base_freq"], None
  if local_scaling is not None:
    raise UnsupportedModelError(
      f"gemma3 local (sliding_attention) RoPE scaling {local_scaling.kind!r} is not supported"
    )
  return theta, scaling, float(local_theta)
