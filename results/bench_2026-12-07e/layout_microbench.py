"""A/B: decode attention over a long cache, k/v stored [B,S,G,H] (today) vs [B,G,S,H].
24 layers of Qwen-0.5B attention shapes (G=2, Q=7, H=64), one query, cache 6144 rows,
4096 written; each layer also writes its new row (dynamic_update_slice) as decode does."""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.model import attention_ops as ops

L, G, Q, H, S, FILLED = 24, 2, 7, 64, 6144, 4096
B = int(sys.argv[1]) if len(sys.argv) > 1 else 1


def dense_bgsh(q, k, v, key_mask):
  b, t, g, qh, h = q.shape
  q = q.transpose(0, 2, 3, 1, 4).reshape(b, g, qh * t, h)
  logits = jnp.einsum("BGMH,BGSH->BGMS", q, k, preferred_element_type=jnp.float32) * h**-0.5
  logits = logits.reshape(b, g, qh, t, -1)
  logits = jnp.where(key_mask[:, None, None], logits, -1e30)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, g, qh * t, -1)
  out = jnp.einsum("BGMS,BGSH->BGMH", probs, v)
  return out.reshape(b, g, qh, t, h).transpose(0, 3, 1, 2, 4)


def attn_bgsh(q, k, v, key_mask):
  sizes = ops.prefix_sizes(q.shape[1], k.shape[2])
  seen = key_mask.any(axis=(0, 1))
  rows = jnp.where(seen.any(), seen.shape[0] - jnp.argmax(seen[::-1]), 0)
  branch = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), rows), len(sizes) - 1)

  def on(n):
    return lambda q, k, v, m: dense_bgsh(q, k[:, :, :n], v[:, :, :n], m[..., :n])

  return jax.lax.switch(branch, [on(n) for n in sizes], q, k, v, key_mask)


def make_step(layout):
  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def step(x, ks, vs, index):
    key_mask = (jnp.arange(S) <= index)[None, None, :].repeat(B, 0)
    new_k, new_v = [], []
    for l in range(L):
      q = x.reshape(B, 1, G, Q, H)
      kn = x[:, :, : G * H].reshape(B, 1, G, H)
      if layout == "bsgh":
        kc = jax.lax.dynamic_update_slice(ks[l], kn, (0, index, 0, 0))
        vc = jax.lax.dynamic_update_slice(vs[l], kn, (0, index, 0, 0))
        out = ops.attention(q, kc, vc, key_mask, "dense")
      else:
        kn = kn.transpose(0, 2, 1, 3)
        kc = jax.lax.dynamic_update_slice(ks[l], kn, (0, 0, index, 0))
        vc = jax.lax.dynamic_update_slice(vs[l], kn, (0, 0, index, 0))
        out = attn_bgsh(q, kc, vc, key_mask)
      x = x + 0.01 * out.reshape(x.shape)
      new_k.append(kc)
      new_v.append(vc)
    return x, tuple(new_k), tuple(new_v)

  return step


rng = np.random.default_rng(0)
res = {}
steps = {}
data = {}
for layout in ("bsgh", "bgsh"):
  shape = (B, S, G, H) if layout == "bsgh" else (B, G, S, H)
  ks = tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(L))
  vs = tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(L))
  steps[layout] = make_step(layout)
  data[layout] = [jnp.asarray(rng.standard_normal((B, 1, G * Q * H), np.float32)), ks, vs]
times = {k: [] for k in steps}
for _rnd in range(3):
  for layout, fn in steps.items():
    x, ks, vs = data[layout]
    idx = jnp.int32(FILLED)
    x, ks, vs = fn(x, ks, vs, idx)
    x.block_until_ready()
    t0 = time.perf_counter()
    for i in range(8):
      x, ks, vs = fn(x, ks, vs, jnp.int32(FILLED + i))
    x.block_until_ready()
    times[layout].append((time.perf_counter() - t0) / 8 * 1e3)
    data[layout] = [x, ks, vs]
print(B, {k: [round(t, 2) for t in v] for k, v in times.items()})
