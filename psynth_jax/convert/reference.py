"""The reference release's cache mapper (a torch state dict) <-> our `affine` `Mapper`.

The reference mapper is `net = nn.Sequential(nn.Linear(3, 32), nn.SiLU(),
nn.Linear(32, 4))`, saved as its state dict:

  net.0.weight [32, 3]   net.0.bias [32]   net.2.weight [4, 32]   net.2.bias [4]

Torch `Linear` weights are [out, in]; flax `nnx.Linear` kernels are [in, out],
so weights are transposed. State dicts are read with
`torch.load(..., weights_only=True)` (no pickled code runs); torch is imported
only inside these functions.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from psynth_jax.mapper import HIDDEN, Mapper

# Reference key -> (our path in the AffineMapper state, reference shape, transpose?).
# The one table of the reference's torch names: import, export and the trainer's
# export folders all go through it (`head_affine` has the same layers, 5 inputs).
NAME_TABLE = {
  "net.0.weight": (("fc1", "kernel"), (HIDDEN, 3), True),
  "net.0.bias": (("fc1", "bias"), (HIDDEN,), False),
  "net.2.weight": (("fc2", "kernel"), (4, HIDDEN), True),
  "net.2.bias": (("fc2", "bias"), (4,), False),
}


def mapper_from_state_dict(
  state: dict[str, np.ndarray],
  num_layers: int,
  features: str = "both",
  source: str = "state dict",
  kind: str = "affine",
) -> Mapper:
  """A Mapper of `kind` from a state dict with the reference's names (names and shapes checked)."""
  missing = sorted(set(NAME_TABLE) - set(state))
  unexpected = sorted(set(state) - set(NAME_TABLE))
  if missing or unexpected:
    raise KeyError(
      f"{source} is not a reference mapper state dict: missing={missing},"
      f" unexpected={unexpected} (expected {sorted(NAME_TABLE)})"
    )
  template = Mapper.create(kind, num_layers, features)
  if template.is_identity:
    raise ValueError(f"the {kind!r} mapper has no parameters, so no state dict")
  ours = {tuple(path): var for path, var in nnx.to_flat_state(template.state)}
  by_path = {}
  for key, (path, _, transpose) in NAME_TABLE.items():
    w = np.asarray(state[key], np.float32)
    want = ours[path].shape[::-1] if transpose else ours[path].shape
    if tuple(w.shape) != tuple(want):
      hint = ""
      if kind == "affine" and key == "net.0.weight" and w.shape in ((HIDDEN, 1), (HIDDEN, 2)):
        hint = (
          " (a reference ablation checkpoint that drops unused features; only"
          " 3-feature checkpoints load today)"
        )
      raise ValueError(
        f"{source}: {key!r} has shape {tuple(w.shape)}, expected {tuple(want)}{hint}"
      )
    by_path[path] = w.T if transpose else w
  flat = [
    (path, var.replace(jnp.asarray(by_path[tuple(path)], var.dtype)))
    for path, var in nnx.to_flat_state(template.state)
  ]
  return template.replace(state=nnx.from_flat_state(flat))


def mapper_to_state_dict(mapper: Mapper) -> dict[str, np.ndarray]:
  """The state dict (float32 numpy, the reference's names and layout) of a Mapper."""
  if mapper.is_identity:
    raise ValueError(f"the {mapper.kind!r} mapper has no parameters, so no state dict")
  values = {tuple(path): np.asarray(var[...]) for path, var in nnx.to_flat_state(mapper.state)}
  return {
    key: np.ascontiguousarray(values[path].T if transpose else values[path], np.float32)
    for key, (path, _, transpose) in NAME_TABLE.items()
  }


def load_reference_mapper(
  path: str | os.PathLike, num_layers: int, features: str = "both"
) -> Mapper:
  """Loads the reference release's mapper state dict into an `affine` Mapper.

  Args:
    path: a file written by `torch.save(mapper.state_dict(), path)`.
    num_layers: the base model's layer count (the layer feature is l / (L - 1)).
    features: feature mode, `both | length | num_workers | none` (ours zeroes
      dropped features; the file must still have 3 input features).

  Raises:
    KeyError: keys missing or unexpected (names them); ValueError: a wrong shape.
  """
  import torch

  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  arrays = {k: v.detach().float().numpy() if hasattr(v, "detach") else v for k, v in state.items()}
  return mapper_from_state_dict(arrays, num_layers, features, source=os.fspath(path))


def save_reference_mapper(mapper: Mapper, path: str | os.PathLike) -> None:
  """Saves an `affine` Mapper as a reference torch state dict (inverse of the loader)."""
  import torch

  if mapper.kind != "affine":
    raise ValueError(
      f"only the paper's 'affine' mapper has a reference layout, not {mapper.kind!r}"
    )
  state = {k: torch.tensor(v) for k, v in mapper_to_state_dict(mapper).items()}  # copies
  torch.save(state, path)
