"""Whole decode steps of Qwen2.5-Coder-0.5B fp32 over a 6,144-row cache holding 4,096 rows
(and a 288-row cache holding 48): parent e076b95 (a static prefix, package psynth_jax_old,
made as in ab_decode_blocks.py) against `decode_attention` with 512-, 1,024- and 2,048-row
key blocks, each compiled once, then timed round by round in one process (7 rounds of 3;
`--b1`: the long-cache B = 1 case alone, 25 rounds)."""

import functools
import statistics
import sys
import time

sys.path.insert(0, "/tmp/s22/old")
import jax
import psynth_jax_old
from ab_decode_blocks import setup

import psynth_jax
from psynth_jax.eval import bench_meta, limits
from psynth_jax.model import attention_ops

CASES = ((6144, 4096, (1, 3, 16)), (288, 48, (1, 16)))
ROUNDS = 8
if "--b1" in sys.argv:  # the long-cache B = 1 case alone, 25 rounds
  CASES, ROUNDS = ((6144, 4096, (1,)),), 26
run = bench_meta.start(force="--force" in sys.argv)
old, new = setup(psynth_jax_old), setup(psynth_jax)
bw = limits.memory_bandwidth()["bandwidth_gbps"]
rows = []
for cap, filled, batches in CASES:
  for b in batches:
    programs = {}
    for name, (params, decode, state), block in (
      ("parent", old, None),
      ("blocks 512", new, 512),
      ("blocks 1024", new, 1024),
      ("blocks 2048", new, 2048),
    ):
      if block:
        attention_ops.DECODE_BLOCK = block
      jax.clear_caches()
      spec = decode.DecodeSpec(max_new_tokens=10)
      s = state(b, cap, filled, spec)
      compiled = decode.jit_decode_step.lower(params, s, spec=spec).compile()
      programs[name] = (compiled, params, functools.partial(state, b, cap, filled, spec))
    times = {k: [] for k in programs}
    for rnd in range(ROUNDS):
      for name, (compiled, params, make) in programs.items():
        for _ in range(3):
          s = jax.block_until_ready(make())
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(params, s))
          if rnd:
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(cap, filled, b, {k: f"{med[k]:.1f} (min {low[k]:.1f})" for k in med}, flush=True)
    rows.append(dict(capacity=cap, filled=filled, batch=b, times_ms=times, median_ms=med))
meta = {**bench_meta.finish(run), "bandwidth_gbps": bw, "parent": "e076b95"}
out = "decode_block_sizes_ab" + ("_b1" if "--b1" in sys.argv else "")
bench_meta.write(f"/work/main/results/bench_2026-12-08/{out}.json", meta, rows)
