"""Rotary position embeddings in the Hugging Face "rotate half" layout.

A head vector x of size H is split into halves (x1, x2); frequency j rotates the
pair (x1[j], x2[j]) by angle position * inv_freq[j]. Rotations compose, so
`apply_rope(apply_rope(x, p), q) == apply_rope(x, p + q)` for any real p, q:
the cache mapper re-encodes keys by rotating with a negative offset.

A model may use more than one table (Gemma 3: local layers one base, global layers
another): `layer_inv_frequencies` gives each layer its own, and both the forward
and the re-encoding (`psynth_jax.merge`) rotate a layer's keys with that table.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from psynth_jax.model.config import ModelConfig


def inv_frequencies(config: ModelConfig, layer: int | None = None) -> np.ndarray:
  """Per-pair inverse frequencies [H/2] (float64 numpy, folded into the jit).

  `layer`: that layer's table (a sliding layer of a two-base model has the local base,
  unscaled); None: the global table, which every layer of a one-base model uses.
  """
  dim = config.head_dim
  if layer is not None and config.rope_local_theta is not None and config.is_sliding(layer):
    return 1.0 / (config.rope_local_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  if scaling.kind == "llama3":
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled)
  raise ValueError(f"unknown RoPE scaling {scaling.kind!r}")


def layer_inv_frequencies(config: ModelConfig) -> tuple[np.ndarray, ...]:
  """Every layer's table, `inv_frequencies(config, l)` for l in [0, L)."""
  return tuple(inv_frequencies(config, layer) for layer in range(config.num_layers))


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
  """Rotates x [B, T, N, H] to positions [B, T] (int or float); positions broadcast
  against x's first two axes (x [K, G, S, H] and positions [K, 1]: one angle per K)."""
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
