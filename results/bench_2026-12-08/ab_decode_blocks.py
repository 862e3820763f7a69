"""Whole decode steps of Qwen2.5-Coder-0.5B fp32, parent e076b95 (a decode step reads a
static cache prefix, as package psynth_jax_old) against this commit (a loop over the key
blocks written) in one process, alternating round by round; each step over a cache of
`capacity` rows with `filled` written.

The parent package is made importable beside this one by renaming it:
  mkdir -p /tmp/s22/old && git archive e076b95 psynth_jax | tar -x -C /tmp/s22/old
  mv /tmp/s22/old/psynth_jax /tmp/s22/old/psynth_jax_old
  grep -rl psynth_jax /tmp/s22/old/psynth_jax_old | xargs sed -i 's/\bpsynth_jax\b/psynth_jax_old/g'
(it then converts its own copy of the weights under ~/.cache/psynth_jax_old)."""

import statistics
import sys
import time

sys.path.insert(0, "/tmp/s22/old")
import jax
import jax.numpy as jnp
import psynth_jax_old

import psynth_jax
from psynth_jax.eval import bench_meta, limits


def setup(pkg):
  from importlib import import_module

  bm = import_module(pkg.__name__ + ".eval.bench_meta")
  decode = import_module(pkg.__name__ + ".decode")
  KVCache = import_module(pkg.__name__ + ".kv_cache").KVCache
  lm = bm.bench_model("qwen")

  def state(b, cap, filled, spec):
    cache = KVCache.empty(lm.params.config, b, cap).replace(
      valid=jnp.arange(cap)[None].repeat(b, 0) < filled,
      positions=jnp.arange(cap, dtype=jnp.int32)[None].repeat(b, 0),
      index=jnp.asarray(filled, jnp.int32),
    )
    logits = jnp.zeros((b, lm.params.config.vocab_size), jnp.float32)
    return decode.start(logits, jnp.full((b,), filled), cache, jax.random.key(0), spec)

  return lm.params, decode, state


def main() -> None:
  run = bench_meta.start(force="--force" in sys.argv)
  impls = {"parent (prefix)": setup(psynth_jax_old), "this (blocks)": setup(psynth_jax)}
  bw = limits.memory_bandwidth()["bandwidth_gbps"]
  rows = []
  for cap, filled, batches in ((6144, 4096, (1, 3, 16)), (288, 48, (1, 3, 16, 48))):
    for b in batches:
      times = {k: [] for k in impls}
      for rnd in range(3):
        for name, (params, decode, state) in impls.items():
          spec = decode.DecodeSpec(max_new_tokens=10)
          if rnd == 0:
            jax.block_until_ready(
              decode.jit_decode_step(params, state(b, cap, filled, spec), spec=spec)
            )
          for _ in range(5):
            s = jax.block_until_ready(state(b, cap, filled, spec))
            t0 = time.perf_counter()
            jax.block_until_ready(decode.jit_decode_step(params, s, spec=spec))
            times[name].append((time.perf_counter() - t0) * 1e3)
      med = {k: statistics.median(v) for k, v in times.items()}
      a, n = med["parent (prefix)"], med["this (blocks)"]
      print(f"| {cap} ({filled}) | {b} | {a:.1f} | {n:.1f} | {a / n:.2f}x |", flush=True)
      rows.append(dict(capacity=cap, filled=filled, batch=b, times_ms=times, median_ms=med))
      jax.clear_caches()
  meta = {**bench_meta.finish(run), "bandwidth_gbps": bw, "parent": "e076b95"}
  bench_meta.write("/work/main/results/bench_2026-12-08/decode_blocks_ab.json", meta, rows)


if __name__ == "__main__":
  main()
