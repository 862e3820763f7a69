"""`dataclass`: a frozen dataclass that is a pytree whose structure names its class.

Why not `flax.struct.dataclass`: it registers with `jax.tree_util.register_dataclass`,
and at jax 0.10.2 the tree structures of two such classes with the same fields compare
equal (`==`) though their hashes differ. jit's cache finds a compiled program by hash,
then equality, so when two hashes meet in one bucket it hands one class's program to
the other: CI once ran the re-prefill operator as the naive merge (same fields, a
subclass). Here the class is registered as a custom node, whose structures compare by
class. Fields are leaves unless `field(static=True)`; static values must be hashable and
comparable (they are part of the structure, as with flax's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


def field(*, static: bool = False, **kwargs) -> Any:
  """A dataclass field; `static=True` keeps it out of the leaves (part of the structure)."""
  metadata = {**kwargs.pop("metadata", {}), "pytree_node": not static}
  return dataclasses.field(metadata=metadata, **kwargs)


def dataclass(cls):
  """Makes `cls` a frozen dataclass and registers it as a pytree (`replace` included)."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  fields = dataclasses.fields(cls)
  if not all(f.init for f in fields):
    raise TypeError(f"{cls.__name__}: every field of a pytree dataclass is set by __init__")
  data = tuple(f.name for f in fields if f.metadata.get("pytree_node", True))
  meta = tuple(f.name for f in fields if not f.metadata.get("pytree_node", True))
  keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

  def flatten_with_keys(x):
    children = [(key, getattr(x, name)) for key, name in zip(keys, data, strict=True)]
    return children, tuple(getattr(x, name) for name in meta)

  def flatten(x):
    return [getattr(x, name) for name in data], tuple(getattr(x, name) for name in meta)

  def unflatten(static, children):
    kwargs = dict(zip(meta, static, strict=True))
    kwargs.update(zip(data, children, strict=True))
    return cls(**kwargs)

  jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
  cls.replace = lambda self, **updates: dataclasses.replace(self, **updates)
  return cls
