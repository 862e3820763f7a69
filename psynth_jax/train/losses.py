"""Distillation losses over target tokens.

Both losses are token-level (weights 1 for target tokens, 0 for padding and
skipped rows) and reduced over the global batch in one of two ways:

* `normalize="example"` (the reference release's): each example's mean over
  its own target tokens, then the mean over the examples that have any. The
  reference trains with one example per rank and averages over ranks, which
  is this reduction; every example weighs the same whatever its length.
* `normalize="token"`: the mean over all target tokens of the batch, so an
  example's weight grows with its target length (the shipped synthetic
  adapters were trained this way).

The two agree for a batch of one example.

* `cross_entropy`: -log q(y_j | ...) of the synthesizer (student) for each
  target token y_j.
* `kl_to_teacher`: KL(p || q) between the text-concatenation teacher's
  next-token distribution p (base model, every branch as text) and the
  student's q at the same target token, with softmax temperature tau and the
  usual tau^2 factor that keeps gradient scales comparable across tau.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Picks rows of x [B, T, D] at positions [B, Y] -> [B, Y, D]."""
  return jnp.take_along_axis(x, positions[:, :, None], axis=1)


NORMALIZE = ("example", "token")


def weighted_mean(values: jax.Array, weights: jax.Array, normalize: str = "token") -> jax.Array:
  """Weighted mean of [B, Y] values, per token or per example; 0 for an all-padding batch."""
  if normalize == "token":
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  if normalize == "example":
    per_example = jnp.sum(values * weights, -1) / jnp.maximum(jnp.sum(weights, -1), 1.0)  # [B]
    has_tokens = (jnp.sum(weights, -1) > 0).astype(values.dtype)
    return jnp.sum(per_example * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
  raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")


def cross_entropy(
  logits: jax.Array, labels: jax.Array, weights: jax.Array, normalize: str = "example"
) -> jax.Array:
  """Mean CE of float32 logits [B, Y, V] against labels [B, Y] over weighted tokens."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return weighted_mean(ce, weights, normalize)


def kl_to_teacher(
  student_logits: jax.Array,  # [B, Y, V]
  teacher_logits: jax.Array,  # [B, Y, V], no gradient
  weights: jax.Array,  # [B, Y]
  temperature: float = 1.0,
  normalize: str = "example",
) -> jax.Array:
  """Mean token-level KL(teacher || student) * temperature**2 over weighted tokens."""
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  student = student_logits.astype(jnp.float32) / temperature
  log_p = jax.nn.log_softmax(teacher, axis=-1)
  log_q = jax.nn.log_softmax(student, axis=-1)
  # 0 * log(0 / 0) = 0: ids both distributions exclude (-inf logits, an adapter's
  # resized vocabulary) would otherwise give NaN.
  p = jnp.exp(log_p)
  kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)  # [B, Y]
  return weighted_mean(kl, weights, normalize) * temperature**2


def accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Fraction of weighted target tokens whose argmax is the label (a readable metric)."""
  return weighted_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), weights)
