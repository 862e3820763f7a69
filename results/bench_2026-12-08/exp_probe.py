"""Elementwise throughput of XLA:CPU on one [560, 3168] float32 score block (the cache path's
queries x merged rows per kv head): a multiply-add, exp, exp2, and exp after a row max with
its sum. Prints ms and G elements/s, the mean of 50 calls after one warm-up."""

import time

import jax
import jax.numpy as jnp
import numpy as np

x = jnp.asarray(np.random.default_rng(0).standard_normal((560, 3168)).astype(np.float32)) - 3
fns = {
  "mul": jax.jit(lambda x: x * 1.01 + 0.5),
  "exp": jax.jit(jnp.exp),
  "exp2": jax.jit(jnp.exp2),
  "exp-max-sum": jax.jit(lambda x: jnp.exp(x - x.max(-1, keepdims=True)).sum(-1)),
}
for n, f in fns.items():
  f(x).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(50):
    y = f(x)
  y.block_until_ready()
  dt = (time.perf_counter() - t0) / 50
  print(n, f"{dt * 1e3:.3f} ms, {x.size / dt / 1e9:.2f} Gelem/s")
