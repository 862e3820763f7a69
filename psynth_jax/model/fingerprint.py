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


def fingerprint(config: ModelConfig, arrays) -> str:
  """Returns "<config digest>:<digest of a strided sample of every weight tensor>".

  Args:
    config: the model config.
    arrays: {name: array} of concrete weights (numpy or jax, any sharding).
  """
  return digest(config, {name: fingerprint_sample(x) for name, x in arrays.items()})


def fingerprint_sample(x) -> np.ndarray:
  """The strided sample of one tensor that `fingerprint` hashes (host numpy)."""
  flat = x.reshape(-1)
  sample = flat[:: max(1, flat.shape[0] // _SAMPLE)]
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
