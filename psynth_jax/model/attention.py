"""Grouped-query attention with RoPE, optional qkv bias, q/k RMSNorm, Gemma's scale and
score soft-cap, and LoRA.

Queries attend over the layer's cache rows: row s is visible to a query
written at row r iff `valid[s]` and s <= r (see `psynth_jax.kv_cache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psynth_jax.model.attention_ops import attention
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.layers import RMSNorm, param
from psynth_jax.model.lora import LoRALayer
from psynth_jax.model.rope import apply_rope


class Attention(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, n, g, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    dtype = jnp.dtype(config.dtype)
    self.config = config
    # Stored [out, in] (torch's Linear layout): see `psynth_jax.model.layers.MLP`.
    self.q = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype, d**-0.5)
    self.k = param(rngs, (g, h, d), ("kv_heads", "head_dim", "embed"), dtype, d**-0.5)
    self.v = param(rngs, (g, h, d), ("kv_heads", "head_dim", "embed"), dtype, d**-0.5)
    self.o = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dtype, (n * h) ** -0.5)
    if config.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((n, h), dtype), axes=("heads", "head_dim"))
      self.k_bias = nnx.Param(jnp.zeros((g, h), dtype), axes=("kv_heads", "head_dim"))
      self.v_bias = nnx.Param(jnp.zeros((g, h), dtype), axes=("kv_heads", "head_dim"))
    if config.qk_norm:
      plus_one = config.norm_plus_one
      self.q_norm = RMSNorm(h, config.rms_norm_eps, dtype, "head_dim", plus_one)
      self.k_norm = RMSNorm(h, config.rms_norm_eps, dtype, "head_dim", plus_one)

  def _project(self, x, name: str, lora: LoRALayer | None) -> jax.Array:
    w = getattr(self, name)[...]  # [heads, H, D]
    # As one [heads * H, D] matrix: XLA:CPU copies a weight with two free axes into
    # another layout on every call.
    y = jnp.einsum("BTD,MD->BTM", x, w.reshape(-1, w.shape[-1]))
    y = y.reshape(*x.shape[:2], *w.shape[:2])
    if self.config.qkv_bias:
      y = y + getattr(self, f"{name}_bias")[...]
    if lora is not None and (delta := lora.delta(name, x)) is not None:
      y = y + delta.reshape(y.shape)
    return y

  def __call__(
    self,
    x: jax.Array,  # [B, T, D]
    positions: jax.Array,  # [B, T]
    inv_freq: np.ndarray,
    cache_kv: tuple[jax.Array, jax.Array] | None,  # 2 x [B, G, S, H]
    index: jax.Array | None,  # [] first row written by x
    key_mask: jax.Array,  # [B, T, S] bool
    lora: LoRALayer | None = None,
    impl: str = "auto",  # psynth_jax.model.attention_ops.IMPLEMENTATIONS
    key_bias: jax.Array | None = None,  # [B, S] float32 score bias per key row
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    cfg = self.config
    q = self._project(x, "q", lora)  # [B, T, N, H]
    k = self._project(x, "k", lora)  # [B, T, G, H]
    v = self._project(x, "v", lora)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq).transpose(0, 2, 1, 3)  # [B, G, T, H]: the cache's
    v = v.transpose(0, 2, 1, 3)  # layout (`psynth_jax.kv_cache`)

    if cache_kv is not None:
      k_cache, v_cache = cache_kv
      start = (0, 0, index, 0)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
      k, v, new_kv = k_cache, v_cache, (k_cache, v_cache)
    else:
      new_kv = None

    b, t, n, h = q.shape
    g = cfg.num_kv_heads
    # None keeps the default H**-0.5 (the same program as before Gemma's scalar existed).
    scale = None if cfg.query_pre_attn_scalar is None else cfg.attention_scale()
    q = q.reshape(b, t, g, n // g, h)
    out = attention(q, k, v, key_mask, impl, scale, cfg.attn_softcap, key_bias)
    out = out.reshape(b, t, n, h)

    o = self.o[...]  # [D, N, H], as one [D, N * H] matrix (see `_project`)
    y = jnp.einsum("BTM,DM->BTD", out.reshape(b, t, n * h), o.reshape(o.shape[0], -1))
    if lora is not None and (delta := lora.delta("o", out.reshape(b, t, n * h))) is not None:
      y = y + delta
    return y, new_kv
