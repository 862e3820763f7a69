"""Model configuration: one frozen dataclass for every supported decoder family.

Supported `model_type`s: llama (incl. Llama-3 RoPE scaling), mistral, qwen2
(qkv bias), qwen3 (q/k RMSNorm), gemma2 and gemma3_text (`psynth_jax.model.gemma`
reads their configs; a multimodal `gemma3` checkpoint loads as its text part),
mixtral and qwen3_moe (mixture-of-experts MLPs, `psynth_jax.model.moe`).
`ModelConfig.from_hf` reads a Hugging Face `config.json` dict in either the
transformers v4 schema (`rope_theta`, `rope_scaling`, `torch_dtype`) or the v5
schema (`rope_parameters`, `dtype`).

Layers may differ (Gemma): `layer_types[l]` is "full_attention" or
"sliding_attention"; a sliding layer sees keys less than `sliding_window`
positions back and, with `rope_local_theta` set, has its own RoPE base.
`layer_types` None means every layer alike (Mistral: the window, if any, on all).

Mixture of experts: the layers in `moe_layers` replace the MLP by `num_experts`
experts of width `moe_intermediate_size`, `num_experts_per_tok` of them per token;
the other layers keep the dense MLP of width `intermediate_size` (Qwen3-MoE's
`mlp_only_layers` and `decoder_sparse_step`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = (
  "llama",
  "mistral",
  "qwen2",
  "qwen3",
  "gemma2",
  "gemma3_text",
  "mixtral",
  "qwen3_moe",
)
# Mixture-of-experts families we know and do not implement, with what they add.
REFUSED_MOE_TYPES = {
  "qwen2_moe": "shared experts (shared_expert, shared_expert_gate)",
  "deepseek_v2": "MLA attention and shared experts",
  "deepseek_v3": "MLA attention, shared experts and grouped (node-limited) routing",
  "olmoe": "q/k norms over all heads (not per head)",
  "jamba": "Mamba layers",
  "dbrx": "fused Wqkv and clipped qkv",
}
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
  # --- mixture of experts (Mixtral, Qwen3-MoE), likewise out of the digest at defaults.
  num_experts: int = 0  # E
  num_experts_per_tok: int = 0  # top-k experts per token
  moe_intermediate_size: int = 0  # F of each expert
  norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum 1
  moe_layers: tuple[int, ...] = ()  # layers whose MLP is the experts; the rest are dense

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
    if self.moe_layers:
      if not 0 < self.num_experts_per_tok <= self.num_experts:
        raise ValueError(
          f"top-{self.num_experts_per_tok} of {self.num_experts} experts: need 0 < k <= E"
        )
      if self.moe_intermediate_size <= 0:
        raise ValueError("expert layers need a moe_intermediate_size")
      if any(not 0 <= i < self.num_layers for i in self.moe_layers):
        raise ValueError(f"moe_layers {self.moe_layers} outside 0..{self.num_layers - 1}")

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def is_sliding(self, layer: int) -> bool:
    """Whether `layer` is a local (sliding-window) layer with the local RoPE base."""
    if self.layer_types is None:
      return False
    return self.layer_types[layer] == "sliding_attention"

  def is_moe(self, layer: int) -> bool:
    """Whether `layer`'s MLP is a mixture of experts."""
    return layer in self.moe_layers

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
    if model_type in REFUSED_MOE_TYPES:
      raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported: psynth_jax does not implement its"
        f" {REFUSED_MOE_TYPES[model_type]}"
      )
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
    if model_type in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window"):
      raise UnsupportedModelError(
        f"{model_type} with use_sliding_window=True (sliding-window attention on layers from"
        f" max_window_layers={hf.get('max_window_layers')} on) is not supported"
      )
    layer_types = set(hf.get("layer_types") or ())
    if model_type not in ("mistral", "mixtral") and layer_types - {"full_attention"}:
      raise UnsupportedModelError(
        f"{model_type} with layer_types {sorted(layer_types)} is not supported"
        " (only full_attention layers)"
      )
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    rope_theta, rope_scaling = _rope_from_hf(hf)
    qkv_bias = model_type == "qwen2"  # Qwen2 always has q/k/v biases; its config does not say so.
    sliding_window = hf.get("sliding_window")
    if model_type in ("llama", "qwen2", "qwen3", "qwen3_moe"):
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
      qk_norm=model_type in ("qwen3", "qwen3_moe"),
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      sliding_window=sliding_window,
      dtype=hf_dtype(hf, dtype),
      **moe_from_hf(hf),
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
    if "moe_layers" in d:
      d["moe_layers"] = tuple(d["moe_layers"])
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
  "num_experts",
  "num_experts_per_tok",
  "moe_intermediate_size",
  "norm_topk_prob",
  "moe_layers",
)

# transformers' defaults where a config.json leaves a key out (MixtralConfig, Qwen3MoeConfig).
# The expert count is `num_local_experts` in Mixtral's files and in what transformers v5
# writes for Qwen3-MoE too (an attribute alias), `num_experts` in Qwen3-MoE's v4 files.
_MOE_DEFAULTS = {
  "mixtral": dict(num_experts=8, num_experts_per_tok=2),
  "qwen3_moe": dict(
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=768,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
  ),
}


def moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """The mixture-of-experts fields of a mixtral / qwen3_moe config ({} for dense families).

  Mixtral: every layer sparse, experts as wide as `intermediate_size`, top-k always
  renormalised. Qwen3-MoE: layer l is sparse unless l is in `mlp_only_layers` or
  (l + 1) is not a multiple of `decoder_sparse_step` (transformers' rule).
  Router losses (`output_router_logits`, `router_aux_loss_coef`) only matter for
  training the router, which psynth_jax never does: they are read and ignored.
  """
  model_type = hf["model_type"]
  if model_type not in _MOE_DEFAULTS:
    return {}
  d = {**_MOE_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
  if "num_local_experts" in d:
    d["num_experts"] = d["num_local_experts"]
  for key in ("shared_expert_intermediate_size", "n_shared_experts", "num_shared_experts"):
    if d.get(key):
      raise UnsupportedModelError(f"{model_type} with shared experts ({key}={d[key]})")
  if d.get("router_jitter_noise"):
    raise UnsupportedModelError(
      f"{model_type} with router_jitter_noise={d['router_jitter_noise']} (transformers"
      " multiplies the router input by uniform noise in training mode) is not implemented"
    )
  layers = hf["num_hidden_layers"]
  if model_type == "mixtral":
    return dict(
      num_experts=d["num_experts"],
      num_experts_per_tok=d["num_experts_per_tok"],
      moe_intermediate_size=hf["intermediate_size"],
      norm_topk_prob=True,
      moe_layers=tuple(range(layers)),
    )
  experts, step, dense = d["num_experts"], d["decoder_sparse_step"], set(d["mlp_only_layers"])
  sparse = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
  return dict(
    num_experts=experts,
    num_experts_per_tok=d["num_experts_per_tok"],
    moe_intermediate_size=d["moe_intermediate_size"],
    norm_topk_prob=bool(d["norm_topk_prob"]),
    moe_layers=sparse,
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
