"""Per-layer rematerialisation: which activations a decoder layer keeps for the backward pass.

Training differentiates the synthesizer's forward over the merged branch cache.
Without rematerialisation every layer keeps its attention probabilities
[B, heads, T, rows] in float32 for the backward pass, which dominates memory
at long branch budgets. Wrapping each layer in `jax.checkpoint` with a named
policy trades that memory for recomputation in the backward pass:

* "none": keep everything (no recomputation; the fastest, the most memory).
* "full": keep only each layer's input [B, T, D]; the backward pass reruns the
  whole layer forward (about one extra forward pass in total).
* "dots": keep every matmul output, attention scores included (saves the
  elementwise work only; little memory saved at long contexts).
* "dots_no_batch": keep the matmuls without batch dimensions (the q/k/v/o and
  MLP projections, LoRA's) and recompute attention, whose einsums have batch
  dimensions: most of "full"'s saving at a fraction of its recomputation.

The branch caches are inputs of every layer either way (they are not
recomputed): rematerialisation only bounds what the layer computes from them.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.extend.core as jex_core
import numpy as np

POLICIES: dict[str, Callable | None] = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_policy(name: str) -> str:
  if name not in POLICIES:
    raise ValueError(f"remat policy must be one of {sorted(POLICIES)}, got {name!r}")
  return name


def remat_layer(fn: Callable, policy: str) -> Callable:
  """`fn` (one decoder layer's forward), rematerialised under the named policy."""
  if check_policy(policy) == "none":
    return fn
  return jax.checkpoint(fn, policy=POLICIES[policy])


def residuals(
  fn: Callable, *args, argnums: tuple[int, ...] | None = None
) -> list[jax.ShapeDtypeStruct]:
  """What `jax.vjp` of `fn` keeps for the backward pass beyond `args` themselves.

  Only traced, never run: `args` may be `jax.ShapeDtypeStruct`s, so this measures the
  residuals of a 14B model's training step on any machine. Residuals that are inputs
  or arrays `fn` closes over (the weights, the branch caches) are not listed; each
  residual is listed once. XLA may fuse some away, or hold more at once while it
  schedules the backward: this is what the program asks to keep, not a device peak.
  `argnums`: the arguments differentiated (default all); the rest are constants (the
  frozen base, the batch).
  """
  argnums = tuple(range(len(args))) if argnums is None else tuple(argnums)

  def vjp(*a):
    def of_diff(*diff):
      full = list(a)
      for i, x in zip(argnums, diff, strict=True):
        full[i] = x
      return fn(*full)

    return jax.vjp(of_diff, *(a[i] for i in argnums))

  closed, shapes = jax.make_jaxpr(vjp, return_shape=True)(*args)
  num_residuals = len(jax.tree.leaves(shapes[1]))  # vjp_fn's leaves are the residuals
  jaxpr = closed.jaxpr
  inputs = {id(v) for v in (*jaxpr.invars, *jaxpr.constvars)}  # closed-over arrays too
  kept = {}
  for v in jaxpr.outvars[len(jaxpr.outvars) - num_residuals :]:
    if isinstance(v, jex_core.Var) and id(v) not in inputs:
      kept[id(v)] = jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
  return list(kept.values())


def saved_bytes(fn: Callable, *args, argnums: tuple[int, ...] | None = None) -> int:
  """Total bytes of `residuals(fn, *args, argnums=argnums)`."""
  return sum(nbytes(x) for x in residuals(fn, *args, argnums=argnums))


def nbytes(x) -> int:
  return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
