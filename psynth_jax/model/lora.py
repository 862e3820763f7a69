"""LoRA adapters for the synthesizer's projections.

For a target projection W of layer l the adapted output is
`x W + (alpha / rank) * dropout(x) A_l B_l`, with A [D_in, R] initialised like
PEFT (Kaiming-uniform) and B [R, D_out] initialised to zero, so a fresh adapter
leaves the model unchanged. Adapters are `nnx.LoRAParam`s: "what trains" is
the filter `nnx.LoRAParam`. Layouts match PEFT after a transpose (PEFT stores
`lora_A.weight` [R, D_in] and `lora_B.weight` [D_out, R]); q/k/v outputs are
flattened heads-major ([N, H] -> N*H), exactly like the torch projections.

Targets (`TARGETS`), as maps in -> out: the attention projections q, k, v
(D -> N*H or G*H) and o (N*H -> D), and the dense gated MLP's gate, up (D -> F) and
down (F -> D). The
default is the paper's: the attention four (`ATTENTION_TARGETS`). MLP targets
need every layer's MLP to be dense: a mixture-of-experts layer has no single
gate/up/down (per-expert LoRA is not implemented), so `check_lora` refuses
them there. Like PEFT, dropout (training only) acts on each adapted
projection's own input, with its own mask: x for q/k/v/gate/up, the attention
output for o, act(gate) * up for down.

`LoRAWeights` knows no model: its layer count, D_in, D_out and rank are the
shapes of its arrays, so an adapter read from a file needs nothing else.
`check_lora` compares those shapes with the model it is applied to.

An adapter may carry a vocabulary size V' (`LoRAConfig.vocab_size`): the
reference release resized the vocabulary to V' = 151,669 of the base's 151,936
before training, so ids >= V' never occurred. Every forward given such an
adapter sets the logits of ids >= V' to -inf (`vocab_limit`, applied by
`psynth_jax.model.transformer.unembed`), and prompts holding them are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psynth_jax import pytree
from psynth_jax.model.config import ModelConfig

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
# The order is part of every dropout mask (`LoRALayer.delta` folds in the index): append only.
TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class LoRALayer(NamedTuple):
  """One layer's adapters: target -> (A [D_in, R], B [R, D_out])."""

  weights: dict[str, tuple[jax.Array, jax.Array]]
  scale: float
  dropout: float = 0.0
  rng: jax.Array | None = None  # dropout is applied only when a key is given

  def delta(self, target: str, x: jax.Array) -> jax.Array | None:
    """`scale * dropout(x) A B` for `target` ([..., D_in] -> [..., D_out]), None if not adapted."""
    if target not in self.weights:
      return None
    a, b = self.weights[target]
    if self.dropout > 0.0 and self.rng is not None:
      key = jax.random.fold_in(self.rng, TARGETS.index(target))
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    return (x @ a.astype(x.dtype)) @ b.astype(x.dtype) * jnp.asarray(self.scale, x.dtype)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Static LoRA settings.

  Attributes:
    rank, alpha, dropout, targets, use_rslora: as in PEFT's `LoraConfig`.
    vocab_size: V' when the adapter was trained on a vocabulary resized below
      the base model's (None: the model's own); logits of ids >= V' are -inf.
  """

  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ATTENTION_TARGETS
  use_rslora: bool = False  # PEFT option: scale alpha / sqrt(rank)
  vocab_size: int | None = None

  def __post_init__(self):
    unknown = set(self.targets) - set(TARGETS)
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ValueError(
        f"LoRA targets must be distinct names from {TARGETS} (at least one), got {self.targets!r}"
      )
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if self.vocab_size is not None and self.vocab_size < 1:
      raise ValueError(f"LoRA vocab_size must be >= 1 or None, got {self.vocab_size}")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def target_dims(config: ModelConfig, target: str) -> tuple[int, int]:
  """(D_in, D_out) of a target projection (an MLP target's of a dense MLP layer)."""
  d, n, g, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  f = config.intermediate_size
  dims = {"q": (d, n * h), "k": (d, g * h), "v": (d, g * h), "o": (n * h, d)}
  dims.update(gate=(d, f), up=(d, f), down=(f, d))
  return dims[target]


def check_targets(targets: Sequence[str], config: ModelConfig) -> None:
  """Raises ValueError if MLP `targets` are asked of a model with mixture-of-experts layers."""
  mlp = [t for t in targets if t in MLP_TARGETS]
  moe = [i for i in range(config.num_layers) if config.is_moe(i)]
  if mlp and moe:
    raise ValueError(
      f"LoRA targets {mlp} adapt the dense MLP, but layers {moe} of this model are"
      " mixture-of-experts layers, which have no single gate/up/down projection (per-expert"
      f" LoRA is not implemented); use attention targets only, e.g. {ATTENTION_TARGETS}"
    )


class LoRA(nnx.Module):
  """All layers' adapters, stacked over layers: a_<t> [L, D_in, R], b_<t> [L, R, D_out]."""

  def __init__(
    self,
    num_layers: int,
    dims: Mapping[str, tuple[int, int]],  # target -> (D_in, D_out)
    config: LoRAConfig,
    rngs: nnx.Rngs,
  ):
    for t in config.targets:
      d_in, d_out = dims[t]
      # PEFT: kaiming_uniform_(a=sqrt(5)) on [R, D_in] == U(-1/sqrt(D_in), 1/sqrt(D_in)).
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(
        rngs.params(), (num_layers, d_in, config.rank), jnp.float32, -bound, bound
      )
      setattr(self, f"a_{t}", nnx.LoRAParam(a, axes=("layers", None, None)))
      b = jnp.zeros((num_layers, config.rank, d_out), jnp.float32)
      setattr(self, f"b_{t}", nnx.LoRAParam(b, axes=("layers", None, None)))


@pytree.dataclass
class LoRAWeights:
  """A LoRA adapter as a pytree: its config static, `state` the nnx.LoRAParam arrays.

  Shapes (layers, D_in / D_out per target, rank) are those of the arrays.
  """

  config: LoRAConfig = pytree.field(static=True)
  state: nnx.State

  @classmethod
  def init(cls, model_config: ModelConfig, config: LoRAConfig = LoRAConfig(), seed: int = 0):
    """A fresh adapter (B = 0) for `model_config`'s projections (training starts here)."""
    check_targets(config.targets, model_config)
    dims = {t: target_dims(model_config, t) for t in config.targets}
    module = LoRA(model_config.num_layers, dims, config, nnx.Rngs(seed))
    return cls(config, nnx.state(module))

  @classmethod
  def from_arrays(cls, config: LoRAConfig, arrays: Mapping[str, np.ndarray]) -> LoRAWeights:
    """An adapter from {'a_q': [L, D_in, R], 'b_q': [L, R, D_out], ...} (float32).

    Raises:
      KeyError: an array of `config.targets` is missing or another is present.
      ValueError: an array is not 3-D, its rank axis is not `config.rank`, or the
        arrays disagree on L.
    """
    want = {f"{w}_{t}" for t in config.targets for w in "ab"}
    if set(arrays) != want:
      raise KeyError(
        f"LoRA arrays for targets {config.targets}: missing={sorted(want - set(arrays))},"
        f" unexpected={sorted(set(arrays) - want)}"
      )
    shapes = {name: tuple(np.shape(arrays[name])) for name in sorted(want)}
    rank_axis = {"a": 2, "b": 1}  # a [L, D_in, R], b [L, R, D_out]
    ok = all(len(s) == 3 and s[rank_axis[n[0]]] == config.rank for n, s in shapes.items())
    layers = {s[0] for s in shapes.values()}
    if not ok or len(layers) != 1:
      raise ValueError(
        f"LoRA arrays must be a_<t> [L, D_in, R={config.rank}] and b_<t> [L, R, D_out]"
        f" with one L; got {', '.join(f'{n} {s}' for n, s in shapes.items())}"
      )
    num_layers = layers.pop()
    dims = {t: (shapes[f"a_{t}"][1], shapes[f"b_{t}"][2]) for t in config.targets}
    abstract = nnx.eval_shape(lambda: LoRA(num_layers, dims, config, nnx.Rngs(0)))
    flat = [
      (path, var.replace(jnp.asarray(arrays[str(path[0])], jnp.float32)))
      for path, var in nnx.to_flat_state(nnx.state(abstract))
    ]
    return cls(config, nnx.from_flat_state(flat))

  @property
  def num_layers(self) -> int:
    return int(self.state[f"a_{self.config.targets[0]}"][...].shape[0])

  def dims(self, target: str) -> tuple[int, int]:
    """(D_in, D_out) of one target, from its arrays."""
    a, b = self.arrays(target)
    return int(a.shape[1]), int(b.shape[2])

  def module(self) -> LoRA:
    dims = {t: self.dims(t) for t in self.config.targets}
    abstract = nnx.eval_shape(lambda: LoRA(self.num_layers, dims, self.config, nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), self.state)

  def arrays(self, target: str) -> tuple[jax.Array, jax.Array]:
    """(A [L, D_in, R], B [L, R, D_out]) of one target."""
    return self.state[f"a_{target}"][...], self.state[f"b_{target}"][...]

  def layers(self, dropout_rng: jax.Array | None = None) -> tuple[LoRALayer, ...]:
    """Per-layer views used by the forward pass (dropout only when a key is given)."""
    weights = {t: self.arrays(t) for t in self.config.targets}
    out = []
    for i in range(self.num_layers):
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      layer_w = {t: (a[i], b[i]) for t, (a, b) in weights.items()}
      out.append(LoRALayer(layer_w, self.config.scale, self.config.dropout, rng))
    return tuple(out)


def vocab_limit(lora: LoRAWeights | None) -> int | None:
  """V' of an adapter trained on a resized vocabulary: ids >= V' are masked (None: no limit)."""
  return None if lora is None else lora.config.vocab_size


def mask_vocab(logits: jax.Array, lora: LoRAWeights | None) -> jax.Array:
  """Logits [..., V] with ids >= the adapter's `vocab_size` set to -inf (so never sampled)."""
  limit = vocab_limit(lora)
  if limit is None or limit >= logits.shape[-1]:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < limit, logits, -jnp.inf)


def check_lora(lora: LoRAWeights | None, config: ModelConfig) -> None:
  """Raises ValueError if `lora`'s tensors do not fit the model described by `config`.

  Checks the arrays themselves (layer count, D_in, D_out and rank per target):
  an adapter imported from a file may have been built for another model. An
  adapter's `vocab_size` must not exceed the model's vocabulary, and MLP targets
  need a model without mixture-of-experts layers (`check_targets`).
  """
  if lora is None:
    return
  if not isinstance(lora, LoRAWeights):
    raise TypeError(f"lora must be a LoRAWeights or None, got {type(lora).__name__}")
  check_targets(lora.config.targets, config)
  problems = []
  for t in lora.config.targets:
    a, b = lora.arrays(t)
    d_in, d_out = target_dims(config, t)
    want_a = (config.num_layers, d_in, lora.config.rank)
    want_b = (config.num_layers, lora.config.rank, d_out)
    for name, got, want in ((f"a_{t}", a.shape, want_a), (f"b_{t}", b.shape, want_b)):
      if tuple(got) != want:
        problems.append(f"{name} is {tuple(got)}, the model needs {want}")
  vocab = lora.config.vocab_size
  if vocab is not None and vocab > config.vocab_size:
    problems.append(f"its vocabulary has {vocab} ids, the model's {config.vocab_size}")
  if problems:
    raise ValueError(
      "the LoRA adapter does not fit this model ([layers, D_in, rank] / [layers, rank, D_out]"
      f" per target; the model has {config.num_layers} layers): " + "; ".join(problems)
    )


def average_adapters(
  adapters: Sequence[LoRAWeights], weights: Sequence[float] = (0.5, 0.5)
) -> LoRAWeights:
  """The tensor-wise weighted average of adapters: A = sum_i w_i A_i, B = sum_i w_i B_i.

  This is how the reference release was made (a 50/50 average of two
  checkpoints' adapters; its cache mapper was taken from the first checkpoint,
  not averaged). It is NOT the average of the adapters' updates: the result's
  update is (sum_i w_i A_i)(sum_i w_i B_i), which differs from
  sum_i w_i A_i B_i unless the adapters share A or B.

  Args:
    adapters: two or more adapters with equal configs (rank, alpha, dropout,
      targets, rsLoRA, vocab_size) and equal array shapes.
    weights: one weight per adapter, summing to 1 (anything else would scale
      the tensors, not average them, so it is refused).

  Returns:
    A float32 `LoRAWeights` with the adapters' config.

  Raises:
    ValueError: fewer than two adapters, a weight count or sum that does not
      fit, or adapters whose configs or shapes differ (named).
  """
  adapters, weights = list(adapters), [float(w) for w in weights]
  if len(adapters) < 2:
    raise ValueError(f"average_adapters needs at least two adapters, got {len(adapters)}")
  if len(weights) != len(adapters):
    raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights {weights}")
  if not all(math.isfinite(w) for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
    raise ValueError(
      f"weights {weights} must be finite and sum to 1 (they sum to {sum(weights)}); to scale"
      " an adapter instead, change its config's alpha"
    )
  first = adapters[0]
  for i, other in enumerate(adapters[1:], start=1):
    if other.config != first.config:
      raise ValueError(f"adapter {i} has config {other.config}, adapter 0 {first.config}")
    for t in first.config.targets:
      for which, x, y in zip("ab", first.arrays(t), other.arrays(t), strict=True):
        if x.shape != y.shape:
          raise ValueError(
            f"adapter {i}'s {which}_{t} is {tuple(y.shape)}, adapter 0's {tuple(x.shape)}"
          )
  arrays = {}
  for t in first.config.targets:
    for j, which in enumerate("ab"):
      terms = [
        w * jnp.asarray(x.arrays(t)[j], jnp.float32) for w, x in zip(weights, adapters, strict=True)
      ]
      arrays[f"{which}_{t}"] = functools.reduce(jnp.add, terms)
  return LoRAWeights.from_arrays(first.config, arrays)
