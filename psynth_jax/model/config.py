"""Model configuration: one frozen dataclass for every supported decoder family.

Supported `model_type`s: llama (incl. Llama-3 RoPE scaling), mistral, qwen2
(qkv bias), qwen3 (q/k RMSNorm), gemma2 and gemma3_text (`psynth_jax.model.gemma`
reads their configs; a multimodal `gemma3` checkpoint loads as its text part).
`ModelConfig.from_hf` reads a Hugging Face `config.json` dict in either the
transformers v4 schema (`rope_theta`, `rope_scaling`, `torch_dtype`) or the v5
schema (`rope_parameters`, `dtype`).

Layers may differ (Gemma): `layer_types[l]` is "full_attention" or
"sliding_attention"; a sliding layer sees keys less than `sliding_window`
positions back and, with `rope_local_theta` set, has its own RoPE base.
`layer_types` None means every layer alike (Mistral: the window, if any, on all).
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
GEMMA_MODEL_TYPES = ("gemma2", "gemma3", "gemma3_text")  # read by `psynth_jax.model.gemma`
LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
REQUIRED_HF_KEYS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
)


class UnsupportedModelError(ValueError):
  """The checkpoint's architecture or one of its options is not supported."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `kind` is 'linear' or 'llama3'."""

  kind: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of a decoder-only transformer (hashable: used as a jit key)."""

  model_type: str
  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # G
  head_dim: int  # H
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 32768
  sliding_window: int | None = None  # attend to keys less than this many positions back
  dtype: str = "float32"  # parameter and activation dtype: float32 | bfloat16
  # --- fields added for Gemma 2/3; at their defaults they change nothing (and are left
  # out of `digest_dict`, so the fingerprints of earlier models stay what they were).
  layer_types: tuple[str, ...] | None = None  # per layer, LAYER_TYPES; None: all alike
  rope_local_theta: float | None = None  # RoPE base of sliding layers (no scaling)
  mlp_activation: str = "silu"  # MLP_ACTIVATIONS: SwiGLU or GeGLU (gelu, tanh approximation)
  norm_plus_one: bool = False  # RMSNorm scales by (1 + w), in float32 before the cast
  post_norms: bool = False  # RMSNorm on the attention and MLP outputs, before the residual
  embed_scale: bool = False  # embeddings times sqrt(D), rounded to the parameter dtype
  query_pre_attn_scalar: float | None = None  # attention scale is this**-0.5 (None: H)
  attn_softcap: float | None = None  # attention scores -> cap * tanh(scores / cap)
  final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise UnsupportedModelError(
        f"model_type {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(
        f"mlp_activation must be one of {MLP_ACTIVATIONS}, got {self.mlp_activation!r}"
      )
    if self.layer_types is not None:
      if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
        raise ValueError(
          f"layer_types must be {self.num_layers} entries of {LAYER_TYPES}, got {self.layer_types}"
        )
      if "sliding_attention" in self.layer_types and self.sliding_window is None:
        raise ValueError("sliding_attention layers need a sliding_window")

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def is_sliding(self, layer: int) -> bool:
    """Whether `layer` is a local (sliding-window) layer with the local RoPE base."""
    if self.layer_types is None:
      return False
    return self.layer_types[layer] == "sliding_attention"

  def window(self, layer: int) -> int | None:
    """How many positions back `layer`'s queries see (None: all)."""
    if self.layer_types is None:
      return self.sliding_window  # Mistral: one window on every layer
    return self.sliding_window if self.is_sliding(layer) else None

  def attention_scale(self) -> float:
    """The factor on q.k: 1/sqrt(H), or Gemma's 1/sqrt(query_pre_attn_scalar)."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @classmethod
  def from_hf(
    cls, hf: dict[str, Any], dtype: str | None = None, source: str = "config.json"
  ) -> ModelConfig:
    """Builds a config from a Hugging Face `config.json` dict (v4 or v5 schema).

    Raises:
      UnsupportedModelError: an architecture or option we do not implement.
      KeyError: a required key is missing (names `source` and the keys).
    """
    model_type = hf.get("model_type")
    if model_type in GEMMA_MODEL_TYPES:
      from psynth_jax.model.gemma import gemma_from_hf

      return cls(**gemma_from_hf(hf, dtype, source))
    if model_type not in SUPPORTED_MODEL_TYPES:
      archs = hf.get("architectures")
      raise UnsupportedModelError(
        f"unsupported model_type {model_type!r} (architectures={archs});"
        f" psynth_jax supports {SUPPORTED_MODEL_TYPES}"
      )
    if hf.get("mlp_bias"):
      raise UnsupportedModelError("mlp_bias=True is not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise UnsupportedModelError(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    if model_type != "qwen2" and hf.get("attention_bias"):
      # In Llama/Mistral/Qwen3 this flag also biases o_proj, which we do not model.
      raise UnsupportedModelError(f"{model_type} with attention_bias=True is not supported")
    missing = [k for k in REQUIRED_HF_KEYS if hf.get(k) is None]
    if missing:
      raise KeyError(f"{source} ({model_type}) is missing required key(s) {missing}")
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
      raise UnsupportedModelError(
        f"{model_type} with use_sliding_window=True (sliding-window attention on layers from"
        f" max_window_layers={hf.get('max_window_layers')} on) is not supported"
      )
    layer_types = set(hf.get("layer_types") or ())
    if model_type != "mistral" and layer_types - {"full_attention"}:
      raise UnsupportedModelError(
        f"{model_type} with layer_types {sorted(layer_types)} is not supported"
        " (only full_attention layers)"
      )
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    rope_theta, rope_scaling = _rope_from_hf(hf)
    qkv_bias = model_type == "qwen2"  # Qwen2 always has q/k/v biases; its config does not say so.
    sliding_window = hf.get("sliding_window")
    if model_type in ("llama", "qwen2", "qwen3"):
      sliding_window = None  # off unless use_sliding_window (refused above)
    return cls(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=head_dim,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias,
      qk_norm=model_type == "qwen3",
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      sliding_window=sliding_window,
      dtype=hf_dtype(hf, dtype),
    )

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def digest_dict(self) -> dict[str, Any]:
    """`to_dict` without the Gemma-era fields that hold their defaults: what a config
    digest hashes, so that adding fields never changed an existing model's fingerprint."""
    d = self.to_dict()
    for f in dataclasses.fields(self):
      if f.name in LATER_FIELDS and d[f.name] == f.default:
        del d[f.name]
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling"):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("layer_types") is not None:
      d["layer_types"] = tuple(d["layer_types"])  # JSON gives a list; the config is hashed
    return cls(**d)


# Fields added after the first families (see `ModelConfig.digest_dict`).
LATER_FIELDS = (
  "layer_types",
  "rope_local_theta",
  "mlp_activation",
  "norm_plus_one",
  "post_norms",
  "embed_scale",
  "query_pre_attn_scalar",
  "attn_softcap",
  "final_softcap",
)


def hf_dtype(hf: dict[str, Any], dtype: str | None) -> str:
  """`dtype` if given, else the checkpoint's own (bfloat16 or float32)."""
  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    dtype = "bfloat16" if dtype == "bfloat16" else "float32"
  return dtype


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """Reads RoPE theta and scaling from either config schema."""
  params = hf.get("rope_parameters")  # transformers v5
  if params is None:
    params = dict(hf.get("rope_scaling") or {})  # transformers v4
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  return rope_from_params(params, float(hf.get("rope_theta", 10000.0)))


def rope_from_params(params: dict[str, Any], theta: float) -> tuple[float, RopeScaling | None]:
  """Theta and scaling of one v5 `rope_parameters` dict (`theta` where it has none)."""
  theta = float(params.get("rope_theta", theta))
  kind = params.get("rope_type") or params.get("type") or "default"
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling("linear", float(params["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
      "llama3",
      factor=float(params["factor"]),
      low_freq_factor=float(params["low_freq_factor"]),
      high_freq_factor=float(params["high_freq_factor"]),
      original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
  raise UnsupportedModelError(f"RoPE scaling type {kind!r} is not supported")
