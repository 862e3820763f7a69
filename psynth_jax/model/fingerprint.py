"""Fingerprints: the names of a model's config and weights, which caches and adapters carry.

A fingerprint is "<config digest>:<weights digest>": 8 hex digits of every config field,
then 12 of a strided sample of every weight tensor, so that naming a 14B model reads a
few MB yet tells it from any other weights (fine-tuned, another seed, another
checkpoint). Synthesis refuses branch caches whose fingerprint is not its model's.
"""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np

from psynth_jax.model.config import ModelConfig


def config_digest(config: ModelConfig) -> str:
  """8 hex digits of every config field (RoPE theta and scaling included; Gemma-era fields
  only where they differ from their defaults, `ModelConfig.digest_dict`)."""
  text = json.dumps(config.digest_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


# Elements hashed per weight tensor: a strided sample, so that a fingerprint
# costs a few MB of reads even for a 14B model, yet differs for any other
# weights (fine-tuned, another seed, another checkpoint).
_SAMPLE = 4096


# The projections' first layout was [in, out]; they are stored [out, in] now
# (`psynth_jax.model.layers.MLP`). Each is sampled as if it were still laid out so, so
# that the fingerprints recorded before (run folders, adapters, caches) still name the
# same weights: {name suffix: the axes of the stored tensor in the first layout's order}.
FIRST_LAYOUT_AXES = {
  "attn.q": (2, 0, 1),  # [N, H, D] -> [D, N, H]
  "attn.k": (2, 0, 1),
  "attn.v": (2, 0, 1),
  "attn.o": (1, 2, 0),  # [D, N, H] -> [N, H, D]
  "mlp.gate": (1, 0),  # [F, D] -> [D, F]
  "mlp.up": (1, 0),
  "mlp.down": (1, 0),  # [D, F] -> [F, D]
  "lm_head": (1, 0),  # [V, D] -> [D, V]
}


def first_layout_axes(name: str) -> tuple[int, ...] | None:
  return next(
    (a for s, a in FIRST_LAYOUT_AXES.items() if name == s or name.endswith("." + s)), None
  )


def fingerprint(config: ModelConfig, arrays) -> str:
  """Returns "<config digest>:<digest of a strided sample of every weight tensor>".

  Args:
    config: the model config.
    arrays: {name: array} of concrete weights (numpy or jax, any sharding).
  """
  samples = {name: fingerprint_sample(x, first_layout_axes(name)) for name, x in arrays.items()}
  return digest(config, samples)


def fingerprint_sample(x, axes: tuple[int, ...] | None = None) -> np.ndarray:
  """The strided sample of one tensor that `fingerprint` hashes (host numpy), taken in the
  order of `x.transpose(axes)` without transposing it (its elements are gathered)."""
  n = int(np.prod(x.shape))
  step = max(1, n // _SAMPLE)
  if axes is None:
    sample = x.reshape(-1)[::step]
  else:
    coords = np.unravel_index(np.arange(0, n, step), tuple(x.shape[a] for a in axes))
    stored = [None] * len(axes)
    for i, a in enumerate(axes):
      stored[a] = coords[i]
    sample = x[tuple(stored)]
  if isinstance(sample, jax.Array) and not sample.is_fully_addressable:  # multi-host
    from jax.experimental import multihost_utils

    sample = multihost_utils.process_allgather(sample, tiled=True)
  return np.asarray(jax.device_get(sample))


def digest(config: ModelConfig, samples: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for name in sorted(samples):
    sample = samples[name]
    h.update(name.encode())
    h.update(str(sample.dtype).encode())
    h.update(np.ascontiguousarray(sample).view(np.uint8).tobytes())
  return f"{config_digest(config)}:{h.hexdigest()[:12]}"
