"""Small building blocks: RMSNorm, token embedding, SwiGLU MLP.

Every parameter carries logical axis names in its `axes` metadata; the rules
that map them onto a device mesh live in `psynth_jax.sharding`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.model.config import ModelConfig


def param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None) -> nnx.Param:
  """A normal-initialised parameter (std = `scale`, default fan-in) with axis names."""
  if scale is None:
    scale = shape[0] ** -0.5
  value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (as Llama/Qwen do)."""

  def __init__(self, dim: int, eps: float, dtype, axis_name: str = "embed"):
    self.scale = nnx.Param(jnp.ones((dim,), dtype), axes=(axis_name,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # HF casts back to the input dtype before the weight multiply.
    return x32.astype(x.dtype) * self.scale[...]


class Embed(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.embedding = param(
      rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype, 0.02
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
    return jnp.take(self.embedding[...], tokens, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:  # tied head: [B, T, D] -> [B, T, V]
    return jnp.einsum("BTD,VD->BTV", x, self.embedding[...])


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, f, dtype = config.hidden_size, config.intermediate_size, jnp.dtype(config.dtype)
    self.gate = param(rngs, (d, f), ("embed", "mlp"), dtype)
    self.up = param(rngs, (d, f), ("embed", "mlp"), dtype)
    self.down = param(rngs, (f, d), ("mlp", "embed"), dtype)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
    gate = jnp.einsum("BTD,DF->BTF", x, self.gate[...])
    up = jnp.einsum("BTD,DF->BTF", x, self.up[...])
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, self.down[...])
