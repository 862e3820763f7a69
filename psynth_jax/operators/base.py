"""Merge operators: the step from K branch caches to the synthesizer's cache.

Every way of reading worker caches is one `MergeOperator`: the paper's re-encode +
mapper (`reencode`, whose mapper kinds come from `psynth_jax.mapper`'s registry, so
mappers are one family of operators, not a second registry), branches laid end to
end (`sequential`), selective recompute (`recompute`), APE reweighting (`ape`),
outputs re-prefilled alone (`reprefill`), trained link tokens (`links`). An operator is a pytree
(`psynth_jax.pytree.dataclass`): its trainable arrays are leaves, its settings static,
so one passes through `jax.jit` like a mapper does.

  op = operators.create("reencode", config, mapper="affine")
  synthesize(lm, branches, prompt, merge=op)

The interface:

* `merge(params, branches, *, rows, capacity, num_workers)` -> a batch-1 `KVCache`
  of `capacity` rows whose first `rows` hold the merged branches (and the operator's
  own rows), `index` = rows;
* `extra_rows(num_branches)` -> rows the operator adds after the branch rows (static;
  0 but for `links`): callers reserve `rows` >= sum_i len_i + extra_rows(K);
* `start(branches)` -> the position of the synthesizer's first token;
* `flops(config, branches)` -> the merge's own FLOPs (host-side count, for the
  TTFT breakdown; the synthesizer's prefill is counted by `eval.ttft`);
* `check(config)` -> ValueError if the operator was made for another model;
* `order_free`: whether permuting the branches leaves the synthesizer's view
  unchanged (class attribute; the tests check it for every order-free operator).
"""

from __future__ import annotations

from typing import ClassVar

import jax

from psynth_jax.kv_cache import KVCache
from psynth_jax.merge import synth_start_position
from psynth_jax.model.config import ModelConfig

_REGISTRY: dict[str, type[MergeOperator]] = {}


def register(name: str):
  """Class decorator: makes an operator kind available to `create(name, ...)`."""

  def add(cls):
    if name in _REGISTRY:
      raise ValueError(f"merge operator {name!r} is already registered")
    cls.kind = name
    _REGISTRY[name] = cls
    return cls

  return add


def names() -> tuple[str, ...]:
  """The registered operator kinds."""
  return tuple(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, dict]:
  """ "NAME" or "NAME:KEY=VALUE,..." -> (name, options); numbers become int / float."""
  name, _, opts = spec.partition(":")
  options = {}
  for item in filter(None, opts.split(",")):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"operator option {item!r} in {spec!r} is not KEY=VALUE")
    options[key.strip()] = _number(value.strip())
  return name.strip(), options


def from_spec(spec: str, config: ModelConfig) -> MergeOperator:
  """The operator a spec names (`parse_spec`), made for a model of `config`."""
  name, options = parse_spec(spec)
  try:
    return create(name, config, **options)
  except TypeError as e:  # an option the operator does not take
    raise ValueError(f"operator {spec!r}: {e}") from None


def _number(text: str):
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def create(name: str, config: ModelConfig, **options) -> MergeOperator:
  """A fresh operator of kind `name` for a model of `config` (at its identity setting
  where it has trainable parts); `options` are the kind's own (see its `create`)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown merge operator {name!r}; expected one of {names()}")
  return _REGISTRY[name].create(config, **options)


class MergeOperator:
  """The interface; subclasses are `pytree.dataclass`es registered by name."""

  kind: ClassVar[str] = ""
  order_free: ClassVar[bool] = True

  @classmethod
  def create(cls, config: ModelConfig, **options) -> MergeOperator:
    raise NotImplementedError

  @property
  def name(self) -> str:
    """The operator's name in records and tables."""
    return self.kind

  def merge(self, params, branches, *, rows: int, capacity: int, num_workers=None) -> KVCache:
    raise NotImplementedError

  def extra_rows(self, num_branches: int) -> int:
    """Rows the merge writes after the branch rows (its own tokens, e.g. link tokens)."""
    return 0

  def start(self, branches) -> jax.Array:
    """The synthesizer's first position: max_i span_i (the shared-start layout)."""
    return synth_start_position(branches)

  def flops(self, config: ModelConfig, branches) -> float:
    raise NotImplementedError

  def check(self, config: ModelConfig) -> None:
    """Raises ValueError if this operator cannot read caches of a model of `config`."""
