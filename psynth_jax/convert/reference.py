"""The reference release's cache mapper (`cache_mapper.pt`) <-> our `affine` `Mapper`.

The reference mapper is `LengthAwareAffineKVMapper(hidden_dim, metadata_features)`:
`net = nn.Sequential(nn.Linear(F, hidden), nn.SiLU(), nn.Linear(hidden, 4))`,
saved as its state dict beside a `cache_mapper_config.json`
(`{"hidden_dim": 32, "metadata_features": "both"}`):

  net.0.weight [hidden, F]   net.0.bias [hidden]   net.2.weight [4, hidden]   net.2.bias [4]

with F = 3 / 2 / 2 / 1 for `both` / `length` / `num_agents` / `none` (it drops an
unused feature; `psynth_jax.mapper` follows the same convention, and calls
`num_agents` `num_workers`). The file records no layer count: the reference takes
L from the cache it maps, and so does a loaded mapper (`num_layers=None`) unless
one is given.

Torch `Linear` weights are [out, in]; flax `nnx.Linear` kernels are [in, out],
so weights are transposed. State dicts are read with
`torch.load(..., weights_only=True)` (no pickled code runs); torch is imported
only inside these functions.

Older psynth_jax files (trainer exports, state dicts) kept width 3 in every mode
and fed zeros to the dropped features; `mapper_from_state_dict` still reads them,
exactly (see `_drop_zero_fed_columns`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from psynth_jax.mapper import HIDDEN, Mapper, feature_names, normalize_features, num_features

CONFIG_NAME = "cache_mapper_config.json"
STATE_NAME = "cache_mapper.pt"
# Our feature mode -> the reference's `metadata_features` name.
REFERENCE_MODE_NAMES = {
  "both": "both",
  "length": "length",
  "num_workers": "num_agents",
  "none": "none",
}
# The base features of the old width-3 layout, in column order.
_LEGACY_FEATURES = ("length", "num_workers", "layer")

# Reference key -> (our path in the AffineMapper state, transpose?). The one table of
# the reference's torch names: import, export and the trainer's export folders all go
# through it (`head_affine` has the same layers with 2 more inputs). Shapes follow
# from the mapper (`state_dict_shapes`) and are checked on every tensor.
NAME_TABLE = {
  "net.0.weight": (("fc1", "kernel"), True),
  "net.0.bias": (("fc1", "bias"), False),
  "net.2.weight": (("fc2", "kernel"), True),
  "net.2.bias": (("fc2", "bias"), False),
}


def _template(kind: str, num_layers, features: str, hidden_dim: int, source: str) -> Mapper:
  template = Mapper.create(kind, num_layers, features, hidden_dim=hidden_dim)
  if template.is_identity:
    raise ValueError(f"{source}: the {kind!r} mapper has no parameters, so no state dict")
  return template


def _torch_shapes(template: Mapper) -> dict[str, tuple[int, ...]]:
  """Reference key -> the torch-layout shape of `template`'s tensor."""
  ours = {tuple(path): tuple(var.shape) for path, var in nnx.to_flat_state(template.state)}
  absent = sorted(".".join(path) for path, _ in NAME_TABLE.values() if path not in ours)
  if absent:
    raise ValueError(f"the {template.kind!r} mapper has no fc1/fc2 MLP (lacks {absent})")
  return {
    key: ours[path][::-1] if transpose else ours[path]
    for key, (path, transpose) in NAME_TABLE.items()
  }


def state_dict_shapes(
  kind: str = "affine", features: str = "both", hidden_dim: int = HIDDEN
) -> dict[str, tuple[int, ...]]:
  """The reference-layout tensor shapes of a `kind` mapper in mode `features`."""
  return _torch_shapes(_template(kind, None, features, hidden_dim, "state_dict_shapes"))


def _check_keys(state: Mapping, source: str) -> None:
  missing = sorted(set(NAME_TABLE) - set(state))
  unexpected = sorted(set(state) - set(NAME_TABLE))
  if missing or unexpected:
    raise KeyError(
      f"{source} is not a reference mapper state dict: missing={missing},"
      f" unexpected={unexpected} (expected {sorted(NAME_TABLE)})"
    )


def _first_layer(state: Mapping, source: str) -> np.ndarray:
  w = np.asarray(state["net.0.weight"], np.float32)
  if w.ndim != 2:
    raise ValueError(f"{source}: 'net.0.weight' has shape {w.shape}, expected [hidden, F]")
  return w


def _drop_zero_fed_columns(w: np.ndarray, template: Mapper) -> np.ndarray:
  """`net.0.weight` [hidden, in] in the mapper's layout, also from the old width-3 layout.

  psynth_jax used to keep all three base features in every mode and feed zeros to
  the dropped ones. A zero input contributes nothing through its column of the
  first layer, so removing those columns gives the same function exactly.
  """
  want = _torch_shapes(template)["net.0.weight"][1]
  legacy = want + len(_LEGACY_FEATURES) - template.num_features
  if w.shape[1] != legacy or legacy == want:
    return w  # already the mapper's layout (or a wrong width, reported by the shape check)
  kept = feature_names(template.features)
  keep = [i for i, name in enumerate(_LEGACY_FEATURES) if name in kept]
  keep += list(range(len(_LEGACY_FEATURES), legacy))  # cache statistics (head_affine)
  return w[:, keep]


def mapper_from_state_dict(
  state: Mapping[str, np.ndarray],
  num_layers: int | None = None,
  features: str = "both",
  source: str = "state dict",
  kind: str = "affine",
  hidden_dim: int | None = None,
) -> Mapper:
  """A Mapper of `kind` from a state dict with the reference's names (names and shapes checked).

  Args:
    state: reference key -> array (torch layout, [out, in]).
    num_layers: the depth to record (None: the mapper fits any depth).
    features: the feature mode the weights were trained in (`num_agents` allowed).
      `net.0.weight` is [hidden, F (+ statistics)]; the old psynth_jax layout with
      3 base features in every mode is read too.
    source: names the file in errors.
    kind: the mapper kind (`affine` or any kind with an `fc1` / `fc2` MLP).
    hidden_dim: the hidden width, if a config states it (default: from `net.0.weight`).

  Raises:
    KeyError: keys missing or unexpected (names them); ValueError: a wrong shape.
  """
  _check_keys(state, source)
  arrays = {key: np.asarray(state[key], np.float32) for key in NAME_TABLE}
  w0 = _first_layer(arrays, source)
  if hidden_dim is not None and w0.shape[0] != hidden_dim:
    raise ValueError(
      f"{source}: 'net.0.weight' has shape {w0.shape} (hidden width {w0.shape[0]}),"
      f" but hidden_dim {hidden_dim} was stated"
    )
  template = _template(kind, num_layers, features, w0.shape[0], source)
  arrays["net.0.weight"] = _drop_zero_fed_columns(w0, template)
  want = _torch_shapes(template)
  inputs = want["net.0.weight"][1]
  reads = f"{template.num_features} features" + (
    f" + {inputs - template.num_features} cache statistics"
    if inputs > template.num_features
    else ""
  )
  for key, w in arrays.items():
    if tuple(w.shape) != want[key]:
      raise ValueError(
        f"{source}: {key!r} has shape {tuple(w.shape)}, expected {want[key]} for a {kind!r}"
        f" mapper in mode {template.features!r} (it reads {reads}; hidden width"
        f" {template.hidden_dim})"
      )
  ours = {
    path: arrays[key].T if transpose else arrays[key]
    for key, (path, transpose) in NAME_TABLE.items()
  }
  flat = [
    (path, var.replace(jnp.asarray(ours[tuple(path)], var.dtype)))
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
    for key, (path, transpose) in NAME_TABLE.items()
  }


def _state_path(path: str | os.PathLike) -> str:
  """A mapper file, or a folder holding `cache_mapper.pt` (the release's layout)."""
  path = os.fspath(path)
  return os.path.join(path, STATE_NAME) if os.path.isdir(path) else path


def _read_config(path: str) -> tuple[dict, str]:
  """The `cache_mapper_config.json` beside `path` ({} if there is none), and its path."""
  config_path = os.path.join(os.path.dirname(path), CONFIG_NAME)
  if not os.path.exists(config_path):
    return {}, config_path
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_path}: not a readable JSON file ({e})") from e
  if not isinstance(config, dict):
    raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
  hidden = config.get("hidden_dim")
  if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
    raise ValueError(f"{config_path}: 'hidden_dim' must be a positive int, got {hidden!r}")
  mode = config.get("metadata_features")
  if mode is not None:
    try:
      normalize_features(mode)
    except ValueError as e:
      raise ValueError(f"{config_path}: 'metadata_features': {e}") from e
  return config, config_path


def _resolve_mode(source: str, width: int, hidden: int, config: dict, config_path: str, features):
  """The feature mode from the config, `features=` and net.0.weight's width F, which must agree."""
  if width not in (1, 2, 3):
    raise ValueError(
      f"{source}: 'net.0.weight' is [{hidden}, {width}]; a reference mapper reads 1, 2 or 3"
      " features (none / length or num_agents / both)"
    )
  config_mode = config.get("metadata_features")
  stated = [normalize_features(m) for m in (config_mode, features) if m is not None]
  if len(set(stated)) > 1 or any(num_features(m) != width for m in stated):
    if config_mode is not None:
      said = f"{config_path} says metadata_features={config_mode!r}"
    else:
      said = f"{config_path} {'states no mode' if config else 'does not exist'}"
    hint = ""
    if width == 3 and config_mode is None:
      hint = (
        "; a psynth_jax file of the old layout (3 features in every mode, zeros fed to the"
        " dropped ones) loads with psynth_jax.convert.reference.mapper_from_state_dict"
      )
    raise ValueError(
      f"{source}: the feature mode does not agree: {said}, features={features!r}, and"
      f" 'net.0.weight' [{hidden}, {width}] reads {width} features (both: 3, length /"
      f" num_agents: 2, none: 1){hint}"
    )
  if stated:
    return stated[0]
  if width == 2:
    raise ValueError(
      f"{source}: 'net.0.weight' [{hidden}, 2] reads 2 features, mode 'length' or"
      f" 'num_agents', and no {CONFIG_NAME} beside it says which: pass features='length'"
      " or features='num_agents'"
    )
  return {3: "both", 1: "none"}[width]


def _load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  import torch

  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a damaged or non-torch file
    cause = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    raise ValueError(f"{path}: cannot read it as a torch state dict ({cause})") from e
  if not isinstance(state, Mapping):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
  arrays = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
    arrays[key] = value.detach().to(torch.float32).cpu().numpy()
  return arrays


def load_reference_mapper(
  path: str | os.PathLike, *, features: str | None = None, num_layers: int | None = None
) -> Mapper:
  """Loads the reference release's `cache_mapper.pt` into an `affine` Mapper.

  The feature mode and hidden width come from `cache_mapper_config.json` beside
  the file when there is one, else from `net.0.weight` [hidden, F]: F = 3 is
  `both`, 1 is `none`, and 2 (`length` or `num_agents`) needs the config or
  `features=` to say which.

  Args:
    path: the state dict (`torch.save(mapper.state_dict(), path)`), or a folder
      holding `cache_mapper.pt`.
    features: the feature mode, if known (`both | length | num_agents |
      num_workers | none`); must agree with the config and F.
    num_layers: a depth to record and check (default None: the mapper takes L
      from the cache it maps, as the reference does).

  Raises:
    FileNotFoundError: no such file. KeyError: keys missing or unexpected
    (names them). ValueError: a wrong shape, a mode that the config,
    `features=` and F do not agree on, a file that is not a state dict.
  """
  path = _state_path(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such reference mapper file")
  config, config_path = _read_config(path)
  state = _load_torch_state_dict(path)
  _check_keys(state, path)
  hidden, width = _first_layer(state, path).shape
  mode = _resolve_mode(path, width, hidden, config, config_path, features)
  return mapper_from_state_dict(state, num_layers, mode, path, "affine", config.get("hidden_dim"))


def save_reference_mapper(mapper: Mapper, path: str | os.PathLike) -> str:
  """Saves an `affine` Mapper as the reference does: the state dict + the config beside it.

  `cache_mapper_config.json` (hidden_dim, metadata_features in the reference's
  names) goes into the same folder, so keep one mapper per folder, as the
  release does. The layer count is not saved (the reference has none).

  Args:
    mapper: an `affine` Mapper, any feature mode and hidden width.
    path: the .pt file, or an existing folder (then `<folder>/cache_mapper.pt`).

  Returns:
    The path of the written state dict.
  """
  if mapper.kind != "affine":
    raise ValueError(
      f"only the paper's 'affine' mapper has a reference layout, not {mapper.kind!r}"
    )
  import torch

  path = _state_path(path)
  state = {k: torch.tensor(v) for k, v in mapper_to_state_dict(mapper).items()}  # copies
  torch.save(state, path)
  config = {
    "hidden_dim": mapper.hidden_dim,
    "metadata_features": REFERENCE_MODE_NAMES[mapper.features],
  }
  with open(os.path.join(os.path.dirname(path), CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2)
  return path
