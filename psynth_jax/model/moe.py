"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): a top-k router over E stacked experts.

For each token x the router scores every expert, p = softmax(x @ router) in float32,
keeps the k largest, w = top_k(p) (renormalised to sum 1 with `norm_topk_prob`;
Mixtral always renormalises), and the output is sum_j w_j * expert_{e_j}(x), each
expert a SwiGLU MLP of width F_E = `moe_intermediate_size`. This is inference
routing as transformers does it: no capacity limit and no token is ever dropped, no
router jitter (refused by the config reader), and no auxiliary load-balancing or
z-loss: those only train the router, which the frozen base never needs. The weighted
sum is taken in float32 (transformers rounds Qwen3-MoE's routing weights to the
parameter dtype first, so bfloat16 outputs may differ by that rounding).

Weights are stacked over experts, [E, D, F] / [E, F, D], under the logical axis
`expert`: the sharding rules may put it on a mesh axis (expert parallelism,
`psynth_jax.sharding.EXPERT_PARALLEL_RULES`) or leave it whole.

Two dispatches compute the same function (`DISPATCHES`, `Params.moe_dispatch`):

* "dense": every expert on every token, then the routing weights pick (zero for
  experts not chosen). E/k times the FLOPs; the reference the tests hold the
  other to, and a fine choice for tiny E.
* "sorted" (default): the N*k (token, expert) assignments are sorted by expert,
  so each expert's rows are contiguous; three grouped matmuls
  (`jax.lax.ragged_dot`, group sizes = tokens per expert) compute each row with its
  own expert only, and the rows are unsorted and summed per token. Exact and
  dropless, with static shapes (N*k rows whatever the routing). On GPU and TPU
  ragged_dot is a grouped GEMM; XLA:CPU has no such kernel and jax lowers it to a
  masked dense product, so on a CPU "sorted" costs what "dense" does.

The attention side of these models is Mistral's (Mixtral) or Qwen3's (Qwen3-MoE),
so the KV cache, re-encoding and the mapper are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from psynth_jax.model.config import ModelConfig
from psynth_jax.model.layers import param

DISPATCHES = ("sorted", "dense")


def check_dispatch(name: str) -> str:
  if name not in DISPATCHES:
    raise ValueError(f"moe dispatch must be one of {DISPATCHES}, got {name!r}")
  return name


def route(x: jax.Array, router: jax.Array, k: int, normalize: bool):
  """Top-k routing of tokens x [N, D] over router [D, E].

  Returns:
    weights [N, k] float32 and expert ids [N, k] int32, in descending probability.
  """
  logits = jnp.einsum("ND,DE->NE", x, router)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def _act(gate: jax.Array, gelu: bool) -> jax.Array:
  return jax.nn.gelu(gate, approximate=True) if gelu else jax.nn.silu(gate)


def dense_dispatch(x, weights, experts, gate, up, down, gelu=False) -> jax.Array:
  """Reference: all E experts on all N tokens, x [N, D] -> [N, D]."""
  num_experts = gate.shape[0]
  h = _act(jnp.einsum("ND,EDF->ENF", x, gate), gelu) * jnp.einsum("ND,EDF->ENF", x, up)
  out = jnp.einsum("ENF,EFD->END", h, down)
  # [N, E]: each token's weight on each expert, zero where not routed.
  combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], 1)
  return jnp.einsum("END,NE->ND", out.astype(jnp.float32), combine).astype(x.dtype)


def sorted_dispatch(x, weights, experts, gate, up, down, gelu=False) -> jax.Array:
  """Each (token, expert) assignment through its own expert only, x [N, D] -> [N, D]."""
  n, k = experts.shape
  num_experts = gate.shape[0]
  flat = experts.reshape(n * k)  # [M], M = N k: assignment j is token j // k
  order = jnp.argsort(flat, stable=True)  # rows grouped by expert, ascending
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E], sums to M
  rows = jnp.take(x, order // k, axis=0)  # [M, D]
  h = _act(jax.lax.ragged_dot(rows, gate, sizes), gelu) * jax.lax.ragged_dot(rows, up, sizes)
  out = jax.lax.ragged_dot(h, down, sizes)  # [M, D], sorted order
  unsorted = jnp.zeros_like(out).at[order].set(out).reshape(n, k, -1)  # a permutation
  return jnp.einsum("NKD,NK->ND", unsorted.astype(jnp.float32), weights).astype(x.dtype)


_DISPATCH = {"dense": dense_dispatch, "sorted": sorted_dispatch}


class Experts(nnx.Module):
  """E SwiGLU (or GeGLU) experts, stacked: gate/up [E, D, F], down [E, F, D]."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    e, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
    dtype = jnp.dtype(config.dtype)
    self.gate = param(rngs, (e, d, f), ("expert", "embed", "mlp"), dtype, d**-0.5)
    self.up = param(rngs, (e, d, f), ("expert", "embed", "mlp"), dtype, d**-0.5)
    self.down = param(rngs, (e, f, d), ("expert", "mlp", "embed"), dtype, f**-0.5)


class MoE(nnx.Module):
  """Router [D, E] and stacked experts; `__call__` maps [B, T, D] -> [B, T, D]."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, e = config.hidden_size, config.num_experts
    # The router stays whole: it is D x E, and every token needs every expert's score.
    self.router = param(rngs, (d, e), ("embed", None), jnp.dtype(config.dtype))
    self.experts = Experts(config, rngs)
    self.k = config.num_experts_per_tok
    self.normalize = config.norm_topk_prob
    self.gelu = config.mlp_activation == "gelu_tanh"

  def __call__(self, x: jax.Array, dispatch: str = "sorted") -> jax.Array:
    b, t, d = x.shape
    flat = x.reshape(b * t, d)  # [N, D]
    weights, experts = route(flat, self.router[...], self.k, self.normalize)
    e = self.experts
    out = _DISPATCH[check_dispatch(dispatch)](
      flat, weights, experts, e.gate[...], e.up[...], e.down[...], self.gelu
    )
    return out.reshape(b, t, d)
