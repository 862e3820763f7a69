"""APE-style reweighting (Adaptive Parallel Encoding): temperature and scale on the branch rows.

Training-free. Branches already share a starting position (the re-encoding); APE
then sharpens the synthesizer's attention over the parallel context and rescales
how much of it the context takes, for every query and every layer:

  score(q, branch row j) = q.k_j * scale_h / temperature + log(scale)
  score(q, own row j)    = q.k_j * scale_h

so a branch row's softmax weight is multiplied by `scale` before normalisation, and
the branch scores are divided by `temperature`. The temperature is exact as keys
divided by it (q.(k/T) = q.k / T; RoPE is linear, so before or after re-encoding
is the same); the scale is a per-row score bias carried by the cache
(`KVCache.bias`, rows the synthesizer writes get 0). With a soft-capped model
(Gemma 2) the temperature acts before the cap. temperature = scale = 1 is the
paper's path. Order-free, like the merge itself.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from psynth_jax import pytree
from psynth_jax.model.config import ModelConfig
from psynth_jax.operators.base import register
from psynth_jax.operators.reencode import Reencode, stored_elements


@register("ape")
@pytree.dataclass
class APE(Reencode):
  temperature: float = pytree.field(static=True, default=1.0)
  scale: float = pytree.field(static=True, default=1.0)

  @classmethod
  def create(cls, config, mapper=None, seed=0, temperature: float = 1.0, scale: float = 1.0):
    for key, value in (("temperature", temperature), ("scale", scale)):
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{key}={value!r} must be a positive number")
    base = Reencode.create(config, mapper, seed)
    return cls(base.mapper, float(temperature), float(scale))

  @property
  def name(self) -> str:
    return f"ape/t{self.temperature:g}_s{self.scale:g}"

  @property
  def is_identity(self) -> bool:
    return self.temperature == 1.0 and self.scale == 1.0

  def merge(self, params, branches, *, rows, capacity, num_workers=None):
    cache = super().merge(params, branches, rows=rows, capacity=capacity, num_workers=num_workers)
    if self.is_identity:
      return cache
    # Rows past `rows` are written by the synthesizer later (overwritten, not scaled).
    k = tuple((x / self.temperature).astype(x.dtype) for x in cache.k)
    bias = jnp.where(cache.valid, jnp.float32(math.log(self.scale)), jnp.float32(0))
    return cache.replace(k=k, bias=bias)

  def flops(self, config: ModelConfig, branches) -> float:
    extra = 0 if self.is_identity else stored_elements(config, branches)  # one divide each
    return super().flops(config, branches) + extra
