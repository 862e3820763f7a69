"""Decode attention forms over a [B, G, S, H] cache (24 layers of Qwen 0.5B's G=2, Q=7,
H=64; capacity 6144, 4608-row prefix read): (a) prefix slice + batched einsum (today),
(b) whole capacity + mask, no slice, (c) per-(batch, kv head) 2-D products over
k[b, g, :n] (a contiguous slice)."""

import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

L, G, Q, H, S, N = 24, 2, 7, 64, 6144, 4608
B = int(sys.argv[1])


def soft(logits, mask):
  logits = jnp.where(mask, logits * H**-0.5, -1e30)
  return jax.nn.softmax(logits, axis=-1)


def form_a(q, k, v, mask):  # q [B, G, Q, H]
  k, v, m = k[:, :, :N], v[:, :, :N], mask[:, None, None, :N]
  p = soft(jnp.einsum("bgqh,bgsh->bgqs", q, k), m)
  return jnp.einsum("bgqs,bgsh->bgqh", p, v)


def form_b(q, k, v, mask):
  p = soft(jnp.einsum("bgqh,bgsh->bgqs", q, k), mask[:, None, None, :])
  return jnp.einsum("bgqs,bgsh->bgqh", p, v)


def form_c(q, k, v, mask):
  outs = []
  for b in range(q.shape[0]):
    row = []
    for g in range(G):
      kk, vv = k[b, g, :N], v[b, g, :N]
      p = soft(q[b, g] @ kk.T, mask[b, None, :N])
      row.append(p @ vv)
    outs.append(jnp.stack(row))
  return jnp.stack(outs)


def make(form):
  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def step(x, ks, vs, mask):
    for l in range(L):
      out = form(x.reshape(B, G, Q, H), ks[l], vs[l], mask)
      x = x + 0.01 * out.reshape(x.shape)
    return x, ks, vs

  return step


rng = np.random.default_rng(0)
mask = jnp.asarray(np.arange(S)[None].repeat(B, 0) < 4096)
forms = {"a slice+batched": form_a, "b full+mask": form_b, "c per-head 2-D": form_c}
state = {}
for name in forms:
  ks = tuple(jnp.asarray(rng.standard_normal((B, G, S, H), np.float32)) for _ in range(L))
  vs = tuple(jnp.asarray(rng.standard_normal((B, G, S, H), np.float32)) for _ in range(L))
  state[name] = [jnp.asarray(rng.standard_normal((B, G * Q * H), np.float32)), ks, vs]
steps = {n: make(f) for n, f in forms.items()}
ref = None
times = {n: [] for n in forms}
for rnd in range(4):
  for n, fn in steps.items():
    x, ks, vs = state[n]
    x, ks, vs = fn(x, ks, vs, mask)
    x.block_until_ready()
    t0 = time.perf_counter()
    for _ in range(5):
      x, ks, vs = fn(x, ks, vs, mask)
    x.block_until_ready()
    if rnd:
      times[n].append((time.perf_counter() - t0) / 5 * 1e3)
    state[n] = [x, ks, vs]
print(B, {n: round(statistics.median(t), 1) for n, t in times.items()})
