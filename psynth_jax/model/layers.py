"""Small building blocks: RMSNorm, token embedding, gated MLP (SwiGLU or GeGLU).

Every parameter carries logical axis names in its `axes` metadata; the rules
that map them onto a device mesh live in `psynth_jax.sharding`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRALayer


def param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None) -> nnx.Param:
  """A normal-initialised parameter (std = `scale`, default fan-in) with axis names."""
  if scale is None:
    scale = shape[0] ** -0.5
  value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value.astype(dtype), axes=axes)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (as Llama/Qwen do).

  `plus_one` (Gemma): the stored weight w is an offset, the scale is (1 + w), and the
  product is taken in float32 before the cast (HF's Gemma order; Llama casts first).
  """

  def __init__(self, dim: int, eps: float, dtype, axis_name: str = "embed", plus_one=False):
    init = jnp.zeros if plus_one else jnp.ones  # the identity either way
    self.scale = nnx.Param(init((dim,), dtype), axes=(axis_name,))
    self.eps = eps
    self.plus_one = plus_one

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    # HF casts back to the input dtype before the weight multiply.
    return x32.astype(x.dtype) * self.scale[...]


class Embed(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.embedding = param(
      rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype, 0.02
    )
    # Gemma: sqrt(D) rounded to the parameter dtype first (HF: sqrt(640) is 25.25 in bf16).
    self.multiplier = math.sqrt(config.hidden_size) if config.embed_scale else None

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
    x = jnp.take(self.embedding[...], tokens, axis=0)
    if self.multiplier is not None:
      x = x * jnp.asarray(self.multiplier, x.dtype)
    return x

  def attend(self, x: jax.Array) -> jax.Array:  # tied head: [B, T, D] -> [B, T, V]
    return jnp.einsum("BTD,VD->BTV", x, self.embedding[...])


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); GeGLU (Gemma): gelu, tanh approximation.

  With a `LoRALayer` holding gate / up / down targets, each of those projections
  adds its delta on its own input (x for gate and up, act(gate) * up for down).

  Projections are stored [out, in], torch's Linear layout (attention's and the
  unembedding's too): on a CPU, XLA's products with one row (a decode step at B = 1)
  read a weight laid out so faster than one laid out [in, out] (down_proj's shape:
  1.6x; RESULTS.md, "Weight layout").
  """

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, f, dtype = config.hidden_size, config.intermediate_size, jnp.dtype(config.dtype)
    self.gate = param(rngs, (f, d), ("mlp", "embed"), dtype, d**-0.5)
    self.up = param(rngs, (f, d), ("mlp", "embed"), dtype, d**-0.5)
    self.down = param(rngs, (d, f), ("embed", "mlp"), dtype, f**-0.5)
    self.gelu = config.mlp_activation == "gelu_tanh"

  def __call__(self, x: jax.Array, lora: LoRALayer | None = None) -> jax.Array:  # [B, T, D]
    gate = self._project(x, "BTD,FD->BTF", "gate", lora)  # [B, T, F]
    up = self._project(x, "BTD,FD->BTF", "up", lora)
    act = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
    return self._project(act * up, "BTF,DF->BTD", "down", lora)

  def _project(self, x, spec: str, name: str, lora: LoRALayer | None) -> jax.Array:
    y = jnp.einsum(spec, x, getattr(self, name)[...])
    if lora is not None and (delta := lora.delta(name, x)) is not None:
      y = y + delta
    return y
