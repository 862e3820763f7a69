"""Decode attention forms over a [B, G, S, H] cache, 24 layers of Qwen 0.5B's G=2, Q=7,
H=64 (capacity 6144, 4096 rows written, today's prefix 4608), in one jit per form:
  a  prefix slice + [Q, H] x [S, H]^T batched einsums (today's dense path)
  b  whole capacity + mask (no slice)
  d  prefix slice, scores as [S, H] x [H, Q] (the cache as the long M side)
  f  a while loop over 512-row key blocks up to the written length (dynamic trip count:
     no prefix switch, no slice of the whole prefix), online softmax
  g  as f with 1024-row blocks
  h, i, j  as f with broadcast products summed over H and over the block's rows instead of
     matmuls (one fusion each, the slice inside it), blocks of 512, 256, 128 rows
Usage: python decode_forms_micro.py B"""

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

L, G, Q, H, S, N, W = 24, 2, 7, 64, 6144, 4608, 4096
B = int(sys.argv[1])


def soft(logits, mask, axis=-1):
  logits = jnp.where(mask, logits * H**-0.5, -1e30)
  return jax.nn.softmax(logits, axis=axis)


def form_a(q, k, v, mask, n):  # q [B, G, Q, H]
  k, v, m = k[:, :, :N], v[:, :, :N], mask[:, None, None, :N]
  p = soft(jnp.einsum("bgqh,bgsh->bgqs", q, k), m)
  return jnp.einsum("bgqs,bgsh->bgqh", p, v)


def form_b(q, k, v, mask, n):
  p = soft(jnp.einsum("bgqh,bgsh->bgqs", q, k), mask[:, None, None, :])
  return jnp.einsum("bgqs,bgsh->bgqh", p, v)


def form_d(q, k, v, mask, n):
  k, v, m = k[:, :, :N], v[:, :, :N], mask[:, None, :N, None]
  p = soft(jnp.einsum("bgsh,bgqh->bgsq", k, q), m, axis=2)
  return jnp.einsum("bgsq,bgsh->bgqh", p, v)


def blocks(c, reduce=False):
  def form(q, k, v, mask, n):
    def body(i, carry):
      m, l, acc = carry
      kc = jax.lax.dynamic_slice_in_dim(k, i * c, c, axis=2)
      vc = jax.lax.dynamic_slice_in_dim(v, i * c, c, axis=2)
      mc = jax.lax.dynamic_slice_in_dim(mask, i * c, c, axis=1)[:, None, None]
      if reduce:
        s = jnp.sum(q[:, :, :, None] * kc[:, :, None], -1)
      else:
        s = jnp.einsum("bgqh,bgch->bgqc", q, kc)
      s = jnp.where(mc, s * H**-0.5, -1e30)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      r = jnp.exp(m - m_new)
      if reduce:
        pv = jnp.sum(p[..., None] * vc[:, :, None], 3)
      else:
        pv = jnp.einsum("bgqc,bgch->bgqh", p, vc)
      acc = acc * r[..., None] + pv
      return m_new, l * r + p.sum(-1), acc

    init = (
      jnp.full((B, G, Q), -jnp.inf, jnp.float32),
      jnp.zeros((B, G, Q), jnp.float32),
      jnp.zeros((B, G, Q, H), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, (n + c - 1) // c, body, init)
    return acc / l[..., None]

  return form


def make(form):
  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def step(x, ks, vs, mask, n):
    for i in range(L):
      out = form(x.reshape(B, G, Q, H), ks[i], vs[i], mask, n)
      x = x + 0.01 * out.reshape(x.shape)
    return x, ks, vs

  return step


rng = np.random.default_rng(0)
mask = jnp.asarray(np.arange(S)[None].repeat(B, 0) < W)
n = jnp.int32(W)
forms = {
  "a": form_a,
  "b": form_b,
  "d": form_d,
  "f": blocks(512),
  "g": blocks(1024),
  "h": blocks(512, True),
  "i": blocks(256, True),
  "j": blocks(128, True),
}
state, ref = {}, {}
x0 = rng.standard_normal((B, G * Q * H), np.float32)
for name in forms:
  r = np.random.default_rng(1)
  ks = tuple(jnp.asarray(r.standard_normal((B, G, S, H), np.float32)) for _ in range(L))
  vs = tuple(jnp.asarray(r.standard_normal((B, G, S, H), np.float32)) for _ in range(L))
  state[name] = [jnp.asarray(x0), ks, vs]
steps = {name: make(f) for name, f in forms.items()}
for name, fn in steps.items():  # same function: one step from the same state
  state[name] = list(fn(*state[name], mask, n))
  ref[name] = np.asarray(state[name][0])
errs = {name: float(np.abs(ref[name] - ref["a"]).max()) for name in forms}
times = {name: [] for name in forms}
for rnd in range(5):
  for name, fn in steps.items():
    x, ks, vs = state[name]
    t0 = time.perf_counter()
    for _ in range(5):
      x, ks, vs = fn(x, ks, vs, mask, n)
    x.block_until_ready()
    if rnd:
      times[name].append((time.perf_counter() - t0) / 5 * 1e3)
    state[name] = [x, ks, vs]
print("B", B, "ms per 24 layers", {k: round(statistics.median(t), 2) for k, t in times.items()})
print("max |diff| vs a", errs)
