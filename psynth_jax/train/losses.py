"""Distillation losses over target tokens.

Both losses are token-level and averaged over the real target tokens of the
global batch (weights 1 for target tokens, 0 for padding and skipped rows), so
an example's weight grows with its target length, as in the paper's
next-token cross-entropy.

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
  """Picks rows of x [B, T, D] at positions [B, N] -> [B, N, D]."""
  return jnp.take_along_axis(x, positions[:, :, None], axis=1)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(values * weights) / max(sum(weights), 1): 0 for an all-padding batch."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean CE of float32 logits [B, N, V] against labels [B, N] over weighted tokens."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return weighted_mean(ce, weights)


def kl_to_teacher(
  student_logits: jax.Array,  # [B, N, V]
  teacher_logits: jax.Array,  # [B, N, V], no gradient
  weights: jax.Array,  # [B, N]
  temperature: float = 1.0,
) -> jax.Array:
  """Mean token-level KL(teacher || student) * temperature**2 over weighted tokens."""
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  student = student_logits.astype(jnp.float32) / temperature
  log_p = jax.nn.log_softmax(teacher, axis=-1)
  log_q = jax.nn.log_softmax(student, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, N]
  return weighted_mean(kl, weights) * temperature**2


def accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Fraction of weighted target tokens whose argmax is the label (a readable metric)."""
  return weighted_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), weights)
