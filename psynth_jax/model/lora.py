"""LoRA adapters for the synthesizer's attention projections.

For a target projection W (q, k, v or o) of layer l the adapted output is
`x W + (alpha / rank) * dropout(x) A_l B_l`, with A [D_in, R] initialised like
PEFT (Kaiming-uniform) and B [R, D_out] initialised to zero, so a fresh adapter
leaves the model unchanged. Adapters are `nnx.LoRAParam`s: "what trains" is
the filter `nnx.LoRAParam`. Layouts match PEFT after a transpose (PEFT stores
`lora_A.weight` [R, D_in] and `lora_B.weight` [D_out, R]); q/k/v outputs are
flattened heads-major ([N, H] -> N*H), exactly like the torch projections.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from psynth_jax.model.attention import LoRALayer
from psynth_jax.model.config import ModelConfig

TARGETS = ("q", "k", "v", "o")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS
  use_rslora: bool = False  # PEFT option: scale alpha / sqrt(rank)

  def __post_init__(self):
    unknown = set(self.targets) - set(TARGETS)
    if unknown or not self.targets:
      raise ValueError(f"LoRA targets must be a non-empty subset of {TARGETS}, got {self.targets}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def target_dims(config: ModelConfig, target: str) -> tuple[int, int]:
  """(D_in, D_out) of a target projection."""
  d, n, g, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
  return {"q": (d, n * h), "k": (d, g * h), "v": (d, g * h), "o": (n * h, d)}[target]


class LoRA(nnx.Module):
  """All layers' adapters, stacked over layers: a_<t> [L, D_in, R], b_<t> [L, R, D_out]."""

  def __init__(self, model_config: ModelConfig, config: LoRAConfig, rngs: nnx.Rngs):
    n_layers = model_config.num_layers
    for t in config.targets:
      d_in, d_out = target_dims(model_config, t)
      # PEFT: kaiming_uniform_(a=sqrt(5)) on [R, D_in] == U(-1/sqrt(D_in), 1/sqrt(D_in)).
      bound = 1.0 / math.sqrt(d_in)
      a = jax.random.uniform(
        rngs.params(), (n_layers, d_in, config.rank), jnp.float32, -bound, bound
      )
      setattr(self, f"a_{t}", nnx.LoRAParam(a, axes=("layers", None, None)))
      b = jnp.zeros((n_layers, config.rank, d_out), jnp.float32)
      setattr(self, f"b_{t}", nnx.LoRAParam(b, axes=("layers", None, None)))


@struct.dataclass
class LoRAWeights:
  """A LoRA adapter as a pytree: configs static, `state` the nnx.LoRAParam arrays."""

  config: LoRAConfig = struct.field(pytree_node=False)
  model_config: ModelConfig = struct.field(pytree_node=False)
  state: nnx.State

  @classmethod
  def init(cls, model_config: ModelConfig, config: LoRAConfig = LoRAConfig(), seed: int = 0):
    return cls(config, model_config, nnx.state(LoRA(model_config, config, nnx.Rngs(seed))))

  def module(self) -> LoRA:
    abstract = nnx.eval_shape(lambda: LoRA(self.model_config, self.config, nnx.Rngs(0)))
    return nnx.merge(nnx.graphdef(abstract), self.state)

  def arrays(self, target: str) -> tuple[jax.Array, jax.Array]:
    """(A [L, D_in, R], B [L, R, D_out]) of one target."""
    return self.state[f"a_{target}"][...], self.state[f"b_{target}"][...]

  def layers(self, dropout_rng: jax.Array | None = None) -> tuple[LoRALayer, ...]:
    """Per-layer views used by the forward pass (dropout only when a key is given)."""
    weights = {t: self.arrays(t) for t in self.config.targets}
    out = []
    for i in range(self.model_config.num_layers):
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      layer_w = {t: (a[i], b[i]) for t, (a, b) in weights.items()}
      out.append(LoRALayer(layer_w, self.config.scale, self.config.dropout, rng))
    return tuple(out)


def check_lora(lora: LoRAWeights | None, config: ModelConfig) -> None:
  """Raises ValueError if `lora`'s tensors do not fit the model described by `config`.

  Checks the arrays themselves (layer count, D_in, D_out and rank per target),
  not `lora.model_config`: an adapter imported from a file may have been
  built for another model.
  """
  if lora is None:
    return
  if not isinstance(lora, LoRAWeights):
    raise TypeError(f"lora must be a LoRAWeights or None, got {type(lora).__name__}")
  problems = []
  for t in lora.config.targets:
    a, b = lora.arrays(t)
    d_in, d_out = target_dims(config, t)
    want_a = (config.num_layers, d_in, lora.config.rank)
    want_b = (config.num_layers, lora.config.rank, d_out)
    for name, got, want in ((f"a_{t}", a.shape, want_a), (f"b_{t}", b.shape, want_b)):
      if tuple(got) != want:
        problems.append(f"{name} is {tuple(got)}, the model needs {want}")
  if problems:
    raise ValueError(
      "the LoRA adapter does not fit this model ([layers, D_in, rank] / [layers, rank, D_out]"
      f" per target; the model has {config.num_layers} layers): " + "; ".join(problems)
    )
