"""Cache mappers: learned per-branch, per-layer affine maps of keys and values.

A mapper turns (branch length len_i, number of branches K, layer l [, cache
statistics]) into coefficients (alpha_k, beta_k, alpha_v, beta_v) and maps a
re-encoded branch cache as K' = alpha_k * K + beta_k, V' = alpha_v * V + beta_v.
Every mapper starts as the identity (its last layer is zero-initialised) and
none looks at branch order, so a merged cache is invariant to branch order.

Kinds:
* `identity`: the naive merge (re-encoding only).
* `affine`: the paper's length-aware affine mapper (260 parameters): features
  f = [log1p(max(len_i, 1)), log1p(max(K, 1)), l / (num_layers - 1)] ->
  Linear(3, 32) -> SiLU -> Linear(32, 4); r -> alpha = 1 + 0.1 tanh(r0),
  beta = 0.1 tanh(r1) (keys), likewise r2, r3 (values); one scalar per
  (branch, layer), broadcast over heads, rows and head dims. Feature modes
  `both | length | num_workers | none` zero the dropped features, so the input
  width stays 3 in every mode. The reference release instead drops unused
  features (its `net.0.weight` is [32, 2] for `length` / `num_workers` and
  [32, 1] for `none`): only its `both` checkpoints load here today.
* `head_affine` (ours): the same shape of MLP, shared by all layers and heads,
  but its coefficients are per kv head and it also reads the branch's cache
  statistics at that layer and head: log1p of the mean key and value norms over
  the branch's valid rows. It can rescale heads whose scale drifts with
  position or length, which one scalar per layer cannot.

A new kind is one class in this file: an `nnx.Module` built as `cls(rngs)` with
`coefficients(feats, stats)` and the flags `needs_stats` / `is_identity`,
decorated with `@register("name")`. Its parameters, if it has an `fc1` / `fc2`
MLP, export under the reference's torch names (`psynth_jax.convert.reference`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

FEATURE_MODES = ("both", "length", "num_workers", "none")
HIDDEN = 32


def base_features(
  lengths: jax.Array, num_workers: jax.Array, num_layers: int, mode: str
) -> jax.Array:
  """[K] lengths, [] K -> features [K, L, 3] (dropped features are zero)."""
  if mode not in FEATURE_MODES:
    raise ValueError(f"mapper feature mode must be one of {FEATURE_MODES}, got {mode!r}")
  k = lengths.shape[0]
  f_len = jnp.log1p(jnp.maximum(lengths, 1).astype(jnp.float32))  # [K]
  f_num = jnp.log1p(jnp.maximum(num_workers, 1).astype(jnp.float32)) * jnp.ones((k,))
  if mode in ("num_workers", "none"):
    f_len = jnp.zeros_like(f_len)
  if mode in ("length", "none"):
    f_num = jnp.zeros_like(f_num)
  f_layer = jnp.arange(num_layers, dtype=jnp.float32) / max(num_layers - 1, 1)  # [L]
  return jnp.stack(
    [
      jnp.broadcast_to(f_len[:, None], (k, num_layers)),
      jnp.broadcast_to(f_num[:, None], (k, num_layers)),
      jnp.broadcast_to(f_layer[None, :], (k, num_layers)),
    ],
    axis=-1,
  )


def _to_coefficients(r: jax.Array) -> jax.Array:
  """Raw MLP outputs [..., 4] -> (alpha_k, beta_k, alpha_v, beta_v) [..., 4]."""
  t = 0.1 * jnp.tanh(r)
  return t + jnp.array([1.0, 0.0, 1.0, 0.0], t.dtype)


# kind name -> module class. A class is built as `cls(rngs)`, has `coefficients(feats,
# stats)` and says whether it reads cache statistics (`needs_stats`) and whether it is
# the identity (`is_identity`: merging skips it). A new kind is a class + `@register`.
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

  def __init__(self, rngs: nnx.Rngs):
    del rngs  # no parameters

  def coefficients(self, feats, stats):
    return _to_coefficients(jnp.zeros(feats.shape[:-1] + (1, 4)))  # [K, L, 1, 4]


@register("affine")
class AffineMapper(nnx.Module):
  """The paper's mapper; `fc1`/`fc2` are the reference's `net.0`/`net.2`."""

  needs_stats = False
  is_identity = False

  def __init__(self, rngs: nnx.Rngs, in_features: int = 3):
    self.fc1 = nnx.Linear(in_features, HIDDEN, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, 4, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def coefficients(self, feats, stats):  # feats [K, L, 3] -> [K, L, 1, 4]
    return _to_coefficients(self.fc2(nnx.silu(self.fc1(feats))))[:, :, None, :]


@register("head_affine")
class HeadAffineMapper(AffineMapper):
  needs_stats = True

  def __init__(self, rngs: nnx.Rngs):
    super().__init__(rngs, in_features=5)

  def coefficients(self, feats, stats):  # feats [K, L, 3], stats [K, L, G, 2] -> [K, L, G, 4]
    g = stats.shape[2]
    x = jnp.concatenate([jnp.broadcast_to(feats[:, :, None], feats.shape[:2] + (g, 3)), stats], -1)
    return _to_coefficients(self.fc2(nnx.silu(self.fc1(x))))


def cache_statistics(
  k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], lengths: jax.Array
) -> jax.Array:
  """log1p of mean key / value norms over each branch's valid rows: [K, L, G, 2]."""
  s = k[0].shape[1]
  valid = (jnp.arange(s)[None, :] < lengths[:, None]).astype(jnp.float32)  # [K, S]
  denom = jnp.maximum(valid.sum(-1), 1.0)[:, None]

  def mean_norm(x):  # [K, S, G, H] -> [K, G]
    norms = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
    return jnp.einsum("KSG,KS->KG", norms, valid) / denom

  per_layer = [jnp.stack([mean_norm(kl), mean_norm(vl)], -1) for kl, vl in zip(k, v, strict=True)]
  return jnp.log1p(jnp.stack(per_layer, axis=1))


@struct.dataclass
class Mapper:
  """A cache mapper as a pytree: kind, feature mode and depth static; `state` its params."""

  kind: str = struct.field(pytree_node=False)
  features: str = struct.field(pytree_node=False)
  num_layers: int = struct.field(pytree_node=False)
  state: nnx.State

  @classmethod
  def create(cls, kind: str, num_layers: int, features: str = "both", seed: int = 0) -> Mapper:
    if kind not in _REGISTRY:
      raise ValueError(f"unknown mapper kind {kind!r}; expected one of {kinds()}")
    if features not in FEATURE_MODES:
      raise ValueError(f"mapper feature mode must be one of {FEATURE_MODES}, got {features!r}")
    module = _new_module(kind, seed)
    return cls(kind, features, num_layers, nnx.state(module))

  def module(self) -> nnx.Module:
    abstract = nnx.eval_shape(lambda: _new_module(self.kind, 0))
    return nnx.merge(nnx.graphdef(abstract), self.state)

  def coefficients(self, k, v, lengths: jax.Array, num_workers: jax.Array) -> jax.Array:
    """Coefficients [K, L, G or 1, 4] for branch caches k, v (L x [K, S, G, H])."""
    feats = base_features(lengths, num_workers, self.num_layers, self.features)
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
  """Raises ValueError if `mapper` was made for a model with another layer count."""
  if mapper is None:
    return
  if not isinstance(mapper, Mapper):
    raise TypeError(f"mapper must be a Mapper or None, got {type(mapper).__name__}")
  if mapper.num_layers != num_layers:
    raise ValueError(
      f"the {mapper.kind} mapper was made for {mapper.num_layers} layers, the model has {num_layers}"
    )


def _new_module(kind: str, seed: int) -> nnx.Module:
  return _REGISTRY[kind](nnx.Rngs(seed))


def apply(coeffs: jax.Array, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...]):
  """Maps L x [K, S, G, H] keys/values with coefficients [K, L, G|1, 4]."""
  new_k, new_v = [], []
  for layer, (kl, vl) in enumerate(zip(k, v, strict=True)):
    c = coeffs[:, layer, None, :, None, :].astype(jnp.float32)  # [K, 1, G|1, 1, 4]
    new_k.append((c[..., 0] * kl.astype(jnp.float32) + c[..., 1]).astype(kl.dtype))
    new_v.append((c[..., 2] * vl.astype(jnp.float32) + c[..., 3]).astype(vl.dtype))
  return tuple(new_k), tuple(new_v)
