"""Orbax checkpoints of what training changes: trainable params, optimizer state, step, data position.

The frozen base model is never saved: it is loaded from its own source. A
step directory holds two items:

* `state`: the `TrainState` pytree flattened to {"params.lora.state.a_q.value":
  array, ...} (names from the pytree key paths, so any pytree with the same
  structure restores, and a structure change is named key by key);
* `meta` (JSON): the data iterator position, the leaf names, a sha256 digest of
  every leaf, and free-form `extra` (e.g. the config).

Orbax writes a step into a temporary directory and renames it when complete,
so a crash or kill at any moment leaves every earlier step intact (leftover
temporary directories are removed on the next start). On restore the digest
is checked, so a truncated or corrupted step is detected even where the
storage format would silently return garbage. `restore_latest` logs a clear
error for such a step, moves it aside to `<directory>_corrupt/` and uses the
previous one.

`export` writes the trained parts for use outside training: the LoRA as a
PEFT adapter folder (`psynth_jax.convert.peft.export_peft_lora`; without the
convert package, `lora.safetensors` + `lora_config.json`), and the mapper as
`mapper.safetensors` with the reference release's torch names and layout
(`net.0.weight` [hidden, F] with only the features its mode reads, plus 2 cache
statistics for `head_affine`; `net.0.bias`, `net.2.weight` [4, hidden],
`net.2.bias`; what `psynth_jax.convert.reference.mapper_from_state_dict` reads)
plus `mapper_config.json` (kind, features, num_layers, hidden_dim, and the merge
operator's spec where it trained under one; "path": "text" for a LoRA trained on the text
synthesizer, which must never load as a cache adapter); an operator's own trained arrays
(link tokens) go to `mapper/operator.safetensors` under their field names.
`load_export` reads such a folder back for inference, and also the folders of
older versions, whose ablation-mode mappers kept all 3 features (zero-fed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from psynth_jax.convert import reference


class CheckpointError(RuntimeError):
  """A checkpoint step cannot be restored; the message names the step, its path and the cause."""


class CheckpointMismatchError(CheckpointError):
  """An intact step saved for another state (other names, shapes or dtypes): the run's
  config changed. `restore_latest` never sets such steps aside: nothing is wrong with them."""


def _key_name(key) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten(tree: Any) -> tuple[dict[str, Any], Any]:
  """A pytree -> ({dotted key path: leaf}, treedef)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  flat = {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}
  if len(flat) != len(leaves):
    raise ValueError("two leaves of the state have the same key path name")
  return flat, treedef


def _host_value(x) -> np.ndarray | None:
  """The full value of a leaf on this host (None for arrays sharded across hosts)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0)) if x.is_fully_replicated else None
  return np.asarray(x)


def digest(flat: Mapping[str, Any]) -> str:
  """sha256 over names, dtypes, shapes and bytes of every host-visible leaf."""
  h = hashlib.sha256()
  for name in sorted(flat):
    value = _host_value(flat[name])
    h.update(name.encode())
    if value is not None:
      h.update(f"{value.dtype}{value.shape}".encode())
      h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


def _split_across_hosts(x) -> bool:
  sharding = getattr(x, "sharding", None)
  return sharding is not None and not sharding.is_fully_replicated and jax.process_count() > 1


def _restore_target(x):
  """Host numpy for what `save` wrote as numpy; a sharded abstract array otherwise."""
  if _split_across_hosts(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return np.empty(np.shape(x), x.dtype)


def _place(value, target):
  """Puts a restored leaf where the target leaf lives (numpy stays numpy)."""
  sharding = getattr(target, "sharding", None)
  if sharding is None or isinstance(value, jax.Array):
    return value
  return jax.device_put(value, sharding)


def _cause(e: Exception, limit: int = 300) -> str:
  """A one-line cause (tensorstore errors carry kilobytes of spec)."""
  text = f"{type(e).__name__}: {e}".splitlines()[0]
  return text if len(text) <= limit else text[:limit] + " ..."


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Keeps the last `max_to_keep` steps of a training run under `directory`."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, async_save: bool = False):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where step directories live.
      max_to_keep: older steps are deleted once a newer one is complete.
      async_save: write in a background thread (training continues meanwhile).
    """
    self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "meta")
    )
    self.fallbacks: list[str] = []  # errors of steps that restore_latest skipped

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(
    self,
    step: int,
    state: Any,
    data_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
  ) -> None:
    """Saves `state` (any pytree of arrays) and the data position as step `step`."""
    flat, _ = flatten(state)
    # Replicated leaves (all of a TrainState) go as host numpy, which process 0
    # writes; only arrays sharded across hosts take orbax's per-shard path.
    host = {name: _host_value(x) for name, x in flat.items()}
    flat = {name: x if host[name] is None else host[name] for name, x in flat.items()}
    meta = {
      "data": dict(data_state or {}),
      "names": sorted(flat),
      "digest": digest(flat),
      "extra": dict(extra or {}),
    }
    args = ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """Restores step `step` into the structure, shapes and shardings of `target`.

    Args:
      step: a step from `all_steps()`.
      target: a pytree like the saved state (arrays or `jax.ShapeDtypeStruct`s
        with shardings); restored arrays take its shardings.

    Returns:
      (state, data position dict).

    Raises:
      CheckpointError: the step is missing, unreadable, corrupt, or was saved
        for another state structure.
    """
    where = f"checkpoint step {step} in {self.directory}"
    if step not in self.all_steps():
      raise CheckpointError(f"{where} does not exist (have {self.all_steps()})")
    flat_target, treedef = flatten(target)
    abstract = {name: _restore_target(x) for name, x in flat_target.items()}
    try:
      meta_args = ocp.args.Composite(meta=ocp.args.JsonRestore())
      meta = self._manager.restore(step, args=meta_args)["meta"]
    except Exception as e:  # orbax/json raise many types for a damaged file
      raise CheckpointError(f"{where}: cannot read its metadata ({_cause(e)})") from e
    names = set(meta.get("names", ()))
    if names != set(abstract):
      missing, unexpected = sorted(set(abstract) - names), sorted(names - set(abstract))
      raise CheckpointMismatchError(
        f"{where} was saved for another state structure: missing={missing[:8]},"
        f" unexpected={unexpected[:8]}"
      )
    try:
      restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
      )["state"]
    except Exception as e:  # tensorstore reports truncation and bad chunks in several ways
      raise CheckpointError(f"{where}: cannot read its arrays ({_cause(e)})") from e
    if digest(restored) != meta.get("digest"):
      raise CheckpointError(f"{where} is corrupt: its arrays do not match the saved digest")
    # orbax hands back the saved shape whatever the target's: compare, leaf by leaf.
    changed = [
      f"{name} {tuple(restored[name].shape)}/{restored[name].dtype} (the state has"
      f" {tuple(x.shape)}/{x.dtype})"
      for name, x in abstract.items()
      if tuple(restored[name].shape) != tuple(x.shape) or restored[name].dtype != x.dtype
    ]
    if changed:
      raise CheckpointMismatchError(
        f"{where} was saved for a state of other shapes: {'; '.join(changed[:4])}"
      )
    leaves = [_place(restored[name], flat_target[name]) for name in flat_target]
    return jax.tree_util.tree_unflatten(treedef, leaves), meta.get("data", {})

  def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Restores the newest readable step; None if the directory has no step.

    A step that fails to restore is logged with its error, moved to
    `<directory>_corrupt/<step>-<time>` and the previous step is tried.

    Raises:
      CheckpointError: steps exist but none can be restored.
    """
    errors = []
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, target)
        return step, state, data_state
      except CheckpointMismatchError:
        raise  # the config changed: an earlier step would not fit either, and none is damaged
      except CheckpointError as e:
        message = f"{e}; falling back to an earlier checkpoint"
        logging.error(message)
        self.fallbacks.append(message)
        errors.append(str(e))
        self._quarantine(step)
    if errors:
      raise CheckpointError("no checkpoint can be restored:\n" + "\n".join(errors))
    return None

  def _quarantine(self, step: int) -> None:
    """Moves a bad step out of the way, so that training can save that step again."""
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dest = epath.Path(f"{self.directory}_corrupt") / f"{step}-{int(time.time())}"
      dest.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(os.fspath(src), os.fspath(dest))
    _sync(f"psynth_quarantine_{step}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until an async save is complete."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def export(
  params: dict[str, Any],
  folder: str,
  base_model: str = "",
  merge: str = "",
  synthesizer: str = "cache",
) -> str:
  """Writes the LoRA as a PEFT adapter and the mapper with the reference's names (see top);
  `merge`: the operator spec the adapter was trained under, recorded with the mapper;
  `synthesizer`: the one it was trained for (`train.path`), recorded when "text"."""
  lora, mapper = params["lora"], params["mapper"]
  lora_dir, mapper_dir = os.path.join(folder, "lora"), os.path.join(folder, "mapper")
  os.makedirs(mapper_dir, exist_ok=True)
  try:
    from psynth_jax.convert.peft import export_peft_lora
  except ImportError:  # the convert leaf is optional for training
    os.makedirs(lora_dir, exist_ok=True)
    arrays = {name: np.asarray(a) for name, a in nnx.to_pure_dict(lora.state).items()}
    safetensors.numpy.save_file(arrays, os.path.join(lora_dir, "lora.safetensors"))
    with open(os.path.join(lora_dir, "lora_config.json"), "w") as f:
      json.dump(dataclasses.asdict(lora.config), f, indent=2)
  else:
    export_peft_lora(lora, lora_dir, base_model)
  if not mapper.is_identity and synthesizer == "cache":  # a text arm has no mapper to keep
    # torch Linear layout, weight [out, in]: `affine` is the reference mapper
    # itself; `head_affine` has the same layers with 2 more inputs.
    arrays = reference.mapper_to_state_dict(mapper)
    safetensors.numpy.save_file(arrays, os.path.join(mapper_dir, "mapper.safetensors"))
  with open(os.path.join(mapper_dir, "mapper_config.json"), "w") as f:
    meta = {
      "kind": mapper.kind,
      "features": mapper.features,
      "num_layers": mapper.num_layers,
      "hidden_dim": mapper.hidden_dim,
    }
    if merge:
      meta["merge"] = merge
    if synthesizer != "cache":
      meta["path"] = synthesizer
    json.dump(meta, f, indent=2)
  if "operator" in params:  # the operator's own arrays (link tokens), by field name
    arrays = {name: np.asarray(a) for name, a in _own_arrays(params["operator"]).items()}
    safetensors.numpy.save_file(arrays, os.path.join(mapper_dir, OPERATOR_FILE))
  return folder


OPERATOR_FILE = "operator.safetensors"


def _own_arrays(op) -> dict[str, Any]:
  """{field: array} of a merge operator's own trainable arrays (its mapper left out)."""
  return {
    f.name: getattr(op, f.name)
    for f in dataclasses.fields(op)
    if f.name != "mapper"
    and f.metadata.get("pytree_node", True)
    and getattr(op, f.name) is not None
  }


def _with_own_arrays(op, path: str):
  """`op` (made from its spec, so of the trained shapes) with the arrays saved at `path`."""
  own = op.own_params() if hasattr(op, "own_params") else None
  if own is None:
    if os.path.exists(path):
      raise ValueError(f"{path}: the operator {op.name!r} has no trainable arrays to load")
    return op
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: the operator {op.name!r} was trained with it")
  saved = safetensors.numpy.load_file(path)
  want = _own_arrays(own)
  if set(saved) != set(want):
    raise KeyError(f"{path}: holds {sorted(saved)}, the operator {op.name!r} has {sorted(want)}")
  for name, value in saved.items():
    if value.shape != want[name].shape:
      raise ValueError(
        f"{path}: {name} has shape {value.shape}, the operator's spec gives {want[name].shape}"
      )
  return op.replace(**{name: jnp.asarray(v) for name, v in saved.items()})


def load_export(
  folder: str | os.PathLike, model_config, synthesizer: str = "cache"
) -> tuple[Any, Any]:
  """Reads an `export` folder back: (Mapper, LoRAWeights) for `model_config`'s base model.

  `synthesizer` is what the caller runs ("cache" or "text", as `train.path`); an adapter
  trained for the other is refused. A text adapter comes back as (None, LoRAWeights).

  An adapter trained under a merge operator (`train.merge`, recorded as "merge" in
  mapper_config.json) comes back as that operator around its mapper (a
  `psynth_jax.operators.MergeOperator`, which `synthesize(mapper=...)`, `CacheMode` and
  the trainer accept in a mapper's place), so it runs as it was trained.

  Mappers of older exports (3 features in every mode, `hidden_dim` unrecorded)
  load too, with the same coefficients.

  Raises:
    FileNotFoundError: the folder lacks mapper/mapper_config.json or the LoRA files.
    KeyError / ValueError: tensors missing or of the wrong shape (named); a
      mapper made for another layer count; an adapter of the other synthesizer.
  """
  from psynth_jax.mapper import HIDDEN, Mapper

  folder = os.fspath(folder)
  config_path = os.path.join(folder, "mapper", "mapper_config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{folder} is not an export folder: {config_path} is missing")
  with open(config_path) as f:
    meta = json.load(f)
  if not isinstance(meta, dict) or "kind" not in meta:
    raise ValueError(f"{config_path}: expected a JSON object with the mapper's 'kind'")
  trained_for = meta.get("path", "cache")
  if trained_for != synthesizer:
    raise ValueError(
      f"{folder}: an adapter trained on the {trained_for} synthesizer (train.path="
      f"{trained_for!r}) cannot run the {synthesizer} synthesizer"
    )
  from psynth_jax.convert.peft import load_peft_lora

  if synthesizer == "text":
    return None, load_peft_lora(os.path.join(folder, "lora"), model_config)
  num_layers = meta.get("num_layers")
  if num_layers is not None and num_layers != model_config.num_layers:
    raise ValueError(
      f"{folder}: mapper made for {num_layers} layers, model has {model_config.num_layers}"
    )
  kind, features, hidden = meta["kind"], meta.get("features", "both"), meta.get("hidden_dim")
  mapper = Mapper.create(kind, num_layers, features, hidden_dim=hidden or HIDDEN)
  if not mapper.is_identity:
    weights = os.path.join(folder, "mapper", "mapper.safetensors")
    mapper = reference.mapper_from_state_dict(
      safetensors.numpy.load_file(weights), num_layers, features, weights, kind, hidden
    )
  from psynth_jax.operators import wrapping

  lora = load_peft_lora(os.path.join(folder, "lora"), model_config)
  op = wrapping(meta.get("merge", ""), model_config, mapper)
  if meta.get("merge"):
    op = _with_own_arrays(op, os.path.join(folder, "mapper", OPERATOR_FILE))
  return op, lora
