"""Cache mappers: learned per-branch, per-layer affine maps of keys and values.

A mapper turns (branch length len_i, number of branches K, layer l [, cache
statistics]) into coefficients (alpha_k, beta_k, alpha_v, beta_v) and maps a
re-encoded branch cache as K' = alpha_k * K + beta_k, V' = alpha_v * V + beta_v.
Every mapper starts as the identity (its last layer is zero-initialised) and
none looks at branch order, so a merged cache is invariant to branch order.

Features follow the reference release (`LengthAwareAffineKVMapper`): a feature
mode keeps, in this order, [log1p(max(len_i, 1))] if it reads the length,
[log1p(max(K, 1))] if it reads K, and always the layer position l / (L - 1)
(0 when L = 1). Modes `both | length | num_workers | none` (the reference's
`num_agents` is accepted for `num_workers`) so read F = 3 / 2 / 2 / 1 features:
a dropped feature is not an input at all, and the MLP's first layer is
[F, hidden] (the reference's `net.0.weight` is [hidden, F]).

Depth: L is the number of layers of the cache being mapped. A mapper made
without a layer count (`num_layers=None`, as the reference's, whose file records
none) fits a model of any depth; one made for a given count refuses others.

Kinds:
* `identity`: the naive merge (re-encoding only).
* `affine`: the paper's length-aware affine mapper (260 parameters in mode
  `both` with hidden width 32): features -> Linear(F, hidden) -> SiLU ->
  Linear(hidden, 4); r -> alpha = 1 + 0.1 tanh(r0), beta = 0.1 tanh(r1) (keys),
  likewise r2, r3 (values); one scalar per (branch, layer), broadcast over
  heads, rows and head dims. Loads from and saves to the reference's
  `cache_mapper.pt` in every mode (`psynth_jax.convert.reference`).
* `head_affine` (ours): the same shape of MLP, shared by all layers and heads,
  but its coefficients are per kv head and it also reads the branch's cache
  statistics at that layer and head: log1p of the mean key and value norms over
  the branch's valid rows (inputs F + 2). It can rescale heads whose scale
  drifts with position or length, which one scalar per layer cannot.

A new kind is one class in this file: an `nnx.Module` built as
`cls(rngs, num_features=F, hidden_dim=hidden)` with `coefficients(feats, stats)`
(feats [K, L, F]) and the flags `needs_stats` / `is_identity`, decorated with
`@register("name")`. Its parameters, if it has an `fc1` / `fc2` MLP, export
under the reference's torch names (`psynth_jax.convert.reference`).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax import pytree

FEATURE_MODES = ("both", "length", "num_workers", "none")
# The reference release names K "num_agents"; either name means the same mode.
MODE_ALIASES = {"num_agents": "num_workers"}
HIDDEN = 32  # the paper's hidden width (the default; others load and train too)


def normalize_features(mode: str) -> str:
  """A feature mode in our spelling (lower-cased, stripped, `num_agents` -> `num_workers`)."""
  name = mode.strip().lower() if isinstance(mode, str) else mode
  name = MODE_ALIASES.get(name, name)
  if name not in FEATURE_MODES:
    raise ValueError(
      f"mapper feature mode must be one of {FEATURE_MODES} (or 'num_agents'), got {mode!r}"
    )
  return name


def feature_names(mode: str) -> tuple[str, ...]:
  """The base features mode `mode` feeds the mapper, in input order."""
  mode = normalize_features(mode)
  names = []
  if mode in ("both", "length"):
    names.append("length")
  if mode in ("both", "num_workers"):
    names.append("num_workers")
  return (*names, "layer")


def num_features(mode: str) -> int:
  """F: how many base features mode `mode` reads (3 / 2 / 2 / 1)."""
  return len(feature_names(mode))


def base_features(
  lengths: jax.Array, num_workers: jax.Array, num_layers: int, mode: str
) -> jax.Array:
  """[K] lengths, [] K -> features [K, L, F], only the columns `mode` keeps."""
  k = lengths.shape[0]
  columns = {  # each broadcasts to [K, L]
    "length": jnp.log1p(jnp.maximum(lengths, 1).astype(jnp.float32))[:, None],
    "num_workers": jnp.log1p(jnp.maximum(num_workers, 1).astype(jnp.float32)) * jnp.ones((k, 1)),
    "layer": (jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1))[None, :],
  }
  return jnp.stack(
    [jnp.broadcast_to(columns[name], (k, num_layers)) for name in feature_names(mode)], axis=-1
  )


def _to_coefficients(r: jax.Array) -> jax.Array:
  """Raw MLP outputs [..., 4] -> (alpha_k, beta_k, alpha_v, beta_v) [..., 4]."""
  t = 0.1 * jnp.tanh(r)
  return t + jnp.array([1.0, 0.0, 1.0, 0.0], t.dtype)


# kind name -> module class. A class is built as `cls(rngs, num_features=F,
# hidden_dim=hidden)`, has `coefficients(feats, stats)` and says whether it reads cache
# statistics (`needs_stats`) and whether it is the identity (`is_identity`: merging skips
# it). A new kind is a class + `@register`.
_REGISTRY: dict[str, type[nnx.Module]] = {}


def register(name: str):
  """Class decorator: makes a mapper module available as `Mapper.create(name, ...)`."""

  def add(cls):
    if name in _REGISTRY:
      raise ValueError(f"mapper kind {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls

  return add


def kinds() -> tuple[str, ...]:
  """The registered mapper kinds."""
  return tuple(_REGISTRY)


@register("identity")
class IdentityMapper(nnx.Module):
  needs_stats = False
  is_identity = True

  def __init__(self, rngs: nnx.Rngs, num_features: int = 3, hidden_dim: int = HIDDEN):
    del rngs, num_features, hidden_dim  # no parameters

  def coefficients(self, feats, stats):
    return _to_coefficients(jnp.zeros(feats.shape[:-1] + (1, 4)))  # [K, L, 1, 4]


@register("affine")
class AffineMapper(nnx.Module):
  """The paper's mapper; `fc1`/`fc2` are the reference's `net.0`/`net.2`."""

  needs_stats = False
  is_identity = False
  num_stats = 0  # cache statistics read after the base features

  def __init__(self, rngs: nnx.Rngs, num_features: int = 3, hidden_dim: int = HIDDEN):
    self.fc1 = nnx.Linear(num_features + self.num_stats, hidden_dim, rngs=rngs)
    self.fc2 = nnx.Linear(hidden_dim, 4, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def coefficients(self, feats, stats):  # feats [K, L, F] -> [K, L, 1, 4]
    return _to_coefficients(self.fc2(nnx.silu(self.fc1(feats))))[:, :, None, :]


@register("head_affine")
class HeadAffineMapper(AffineMapper):
  needs_stats = True
  num_stats = 2

  def coefficients(self, feats, stats):  # feats [K, L, F], stats [K, L, G, 2] -> [K, L, G, 4]
    g = stats.shape[2]
    feats = jnp.broadcast_to(feats[:, :, None], feats.shape[:2] + (g, feats.shape[-1]))
    return _to_coefficients(self.fc2(nnx.silu(self.fc1(jnp.concatenate([feats, stats], -1)))))


def cache_statistics(
  k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], lengths: jax.Array
) -> jax.Array:
  """log1p of mean key / value norms over each branch's valid rows: [K, L, G, 2]."""
  s = k[0].shape[2]
  valid = (jnp.arange(s)[None, :] < lengths[:, None]).astype(jnp.float32)  # [K, S]
  denom = jnp.maximum(valid.sum(-1), 1.0)[:, None]

  def mean_norm(x):  # [K, G, S, H] -> [K, G]
    norms = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
    return jnp.einsum("KGS,KS->KG", norms, valid) / denom

  per_layer = [jnp.stack([mean_norm(kl), mean_norm(vl)], -1) for kl, vl in zip(k, v, strict=True)]
  return jnp.log1p(jnp.stack(per_layer, axis=1))


@pytree.dataclass
class Mapper:
  """A cache mapper as a pytree: kind, feature mode, depth and width static; `state` its params.

  `num_layers` is None for a mapper that takes L from the cache it maps (any
  depth); otherwise it is the only depth the mapper accepts.
  """

  kind: str = pytree.field(static=True)
  features: str = pytree.field(static=True)
  num_layers: int | None = pytree.field(static=True)
  state: nnx.State
  hidden_dim: int = pytree.field(static=True, default=HIDDEN)

  @classmethod
  def create(
    cls,
    kind: str,
    num_layers: int | None = None,
    features: str = "both",
    seed: int = 0,
    *,
    hidden_dim: int = HIDDEN,
  ) -> Mapper:
    """A fresh mapper (the identity at init).

    Args:
      kind: a registered kind (`kinds()`).
      num_layers: the model depth it is made for; None: whatever cache it maps.
      features: `both | length | num_workers | none` (or the reference's `num_agents`).
      seed: parameter init seed.
      hidden_dim: width of the MLP's hidden layer.
    """
    if kind not in _REGISTRY:
      raise ValueError(f"unknown mapper kind {kind!r}; expected one of {kinds()}")
    features = normalize_features(features)
    num_layers = None if num_layers is None else _positive_int("num_layers", num_layers)
    hidden_dim = _positive_int("hidden_dim", hidden_dim)
    module = _new_module(kind, seed, features, hidden_dim)
    return cls(kind, features, num_layers, nnx.state(module), hidden_dim)

  def module(self) -> nnx.Module:
    abstract = nnx.eval_shape(lambda: _new_module(self.kind, 0, self.features, self.hidden_dim))
    return nnx.merge(nnx.graphdef(abstract), self.state)

  @property
  def num_features(self) -> int:
    """F: the base features this mapper reads (before any cache statistics)."""
    return num_features(self.features)

  def coefficients(
    self, k, v, lengths: jax.Array, num_workers: jax.Array, spans: jax.Array | None = None
  ) -> jax.Array:
    """Coefficients [K, L, G or 1, 4] for branch caches k, v (L x [K, G, S, H]; L = len(k)).

    `spans` (multi-turn branches: last position + 1) is the length feature where given;
    the cache statistics always average the `lengths` valid rows.
    """
    check_mapper(self, len(k))
    feats = base_features(lengths if spans is None else spans, num_workers, len(k), self.features)
    module = self.module()
    stats = cache_statistics(k, v, lengths) if module.needs_stats else None
    return module.coefficients(feats, stats)

  @property
  def is_identity(self) -> bool:
    """True for a kind that never changes the cache (merging skips it)."""
    return _REGISTRY[self.kind].is_identity

  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.state))


def check_mapper(mapper: Mapper | None, num_layers: int) -> None:
  """Raises ValueError if `mapper` records a layer count other than the model's `num_layers`.

  A mapper with `num_layers=None` fits any depth (it reads L from the cache).
  """
  if mapper is None:
    return
  if not isinstance(mapper, Mapper):
    raise TypeError(f"mapper must be a Mapper or None, got {type(mapper).__name__}")
  if mapper.num_layers is not None and mapper.num_layers != num_layers:
    raise ValueError(
      f"the {mapper.kind} mapper was made for {mapper.num_layers} layers, the model has {num_layers}"
    )


def _positive_int(name: str, value) -> int:
  """`value` as a plain int >= 1 (numpy ints too), or a ValueError naming `name`."""
  try:
    n = operator.index(value) if not isinstance(value, bool) else None
  except TypeError:
    n = None
  if n is None or n < 1:
    raise ValueError(f"mapper {name} must be a positive int, got {value!r}")
  return n


def _new_module(kind: str, seed: int, features: str, hidden_dim: int) -> nnx.Module:
  return _REGISTRY[kind](nnx.Rngs(seed), num_features=num_features(features), hidden_dim=hidden_dim)


def apply(coeffs: jax.Array, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...]):
  """Maps L x [K, G, S, H] keys/values with coefficients [K, L, G|1, 4]."""
  new_k, new_v = [], []
  for layer, (kl, vl) in enumerate(zip(k, v, strict=True)):
    c = coeffs[:, layer, :, None, None, :].astype(jnp.float32)  # [K, G|1, 1, 1, 4]
    new_k.append((c[..., 0] * kl.astype(jnp.float32) + c[..., 1]).astype(kl.dtype))
    new_v.append((c[..., 2] * vl.astype(jnp.float32) + c[..., 3]).astype(vl.dtype))
  return tuple(new_k), tuple(new_v)
