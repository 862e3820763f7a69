"""One layer's blocked attention over a causal prompt of T = S rows (a text prefill, the
KL teacher): parent e076b95 (all queries in one chunk; package psynth_jax_old, made as in
ab_decode_blocks.py) against query chunks of 512 (this commit), forward and gradient,
alternating round by round in one process. Shapes: Qwen 0.5B (G = 2, Q = 7, H = 64) and
SmolLM2-135M (G = 3, Q = 3, H = 64), fp32."""

import statistics
import sys
import time

sys.path.insert(0, "/tmp/s22/old")
import jax
import jax.numpy as jnp
import numpy as np
from psynth_jax_old.model.attention_ops import blocked_attention as parent

from psynth_jax.eval import bench_meta
from psynth_jax.model.attention_ops import blocked_attention as chunked

run = bench_meta.start(force="--force" in sys.argv)
rows = []
for name, g, qh, t in (("qwen05", 2, 7, 1024), ("qwen05", 2, 7, 2048), ("smollm2", 3, 3, 1888)):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, t, g, qh, 64), np.float32))
  k, v = (jnp.asarray(rng.standard_normal((1, g, t, 64), np.float32)) for _ in range(2))
  mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None])
  fns = {}
  for impl, fn in (("parent", parent), ("chunks", chunked)):
    fwd = jax.jit(lambda q, k, v, fn=fn, m=mask: fn(q, k, v, m))
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn, m=mask: jnp.sum(fn(q, k, v, m) ** 2), (0, 1, 2)))
    fns[impl] = (fwd, grad)
  outs = {i: np.asarray(f[0](q, k, v)) for i, f in fns.items()}
  grads = {i: f[1](q, k, v) for i, f in fns.items()}
  err = float(np.abs(outs["parent"] - outs["chunks"]).max())
  gerr = max(
    float(jnp.abs(a - b).max()) for a, b in zip(grads["parent"], grads["chunks"], strict=True)
  )
  times = {f"{i} {p}": [] for i in fns for p in ("fwd", "grad")}
  for _ in range(5):
    for i, (fwd, grad) in fns.items():
      for p, f in (("fwd", fwd), ("grad", grad)):
        t0 = time.perf_counter()
        jax.block_until_ready(f(q, k, v))
        times[f"{i} {p}"].append((time.perf_counter() - t0) * 1e3)
  med = {x: round(statistics.median(y), 1) for x, y in times.items()}
  print(name, t, med, f"max diff fwd {err:.1e} grad {gerr:.1e}", flush=True)
  rows.append(
    dict(model=name, t=t, g=g, q=qh, median_ms=med, times_ms=times, fwd_diff=err, grad_diff=gerr)
  )
bench_meta.write(
  "/work/main/results/bench_2026-12-08/causal_chunks_micro.json", bench_meta.finish(run), rows
)
