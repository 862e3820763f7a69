"""Attention alone: dense vs blocked (psynth_jax.model.attention_ops) at a model's prefill shapes.

  python experiments/bench_attention.py [--out outputs/bench_attention.json]
  python experiments/bench_attention.py --cases decode,"cache synth" --force   # a smoke run

Shapes of Qwen2.5-Coder-0.5B (14 query / 2 kv heads, head dim 64), float32: the text
synthesizer's prefill of K = 3 worker outputs (T queries over T + answer-budget rows,
causal), the cache synthesizer's prompt over a merged cache, and one decode step. Per
case: median wall time of both implementations, their largest difference on queries
that see a key, and the float32 score bytes dense attention holds per call. Decode
cases (one query) also time dense attention as batched matmuls, the form its decode
path replaces from `attention_ops.DECODE_REDUCE_MIN_BATCH` rows on.

Limits measured in the same run sit next to each time (`limits.attention_cost`): the
floor of the computation is max(bytes any implementation moves (q, k, v and the mask
read, the output written) / memory bandwidth, the score and value matmuls' FLOPs over
the visible (causal) entries / matmul GFLOP/s probed at their own shapes, [Q T, H] x
[H, S] and [Q T, S] x [S, H], float32, with M = Q T capped at 2048 rows); both
implementations' times are divided by it. Dense attention's own floor adds writing and
reading its [B, N, T, S] float32 scores and counts every [T, S] entry. Refuses a
loaded machine (1-minute load > 1.0) unless --force, which marks the JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.eval import bench_meta, limits
from psynth_jax.model import attention_ops
from psynth_jax.model.attention_ops import blocked_attention, dense_attention

G, Q, H = 2, 7, 64
PROBE_ROWS = 2048  # the matmul probe's M at most: its [M, S] product must fit in memory
CASES = {  # name: (batch, queries T, cache rows S, causal offset: first query's row)
  "text prefill, 3 x 512 + 200 prompt": (1, 1736, 2248, 0),
  "text prefill, batch 4": (4, 1736, 2248, 0),
  "text prefill, 3 x 4096 (paper budget)": (1, 12488, 16584, 0),
  "cache synth prompt over 3 x 512": (1, 200, 2248, 1536),
  "decode step, 2248 rows": (16, 1, 2248, 2000),
  "decode step, batch 3, 1024 rows": (3, 1, 1024, 1000),
  "decode step, batch 48, 1024 rows": (48, 1, 1024, 1000),  # the eval's worker batch
}


def inputs(rng, b, t, s, offset):
  q = jnp.asarray(rng.normal(size=(b, t, G, Q, H)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, G, s, H)), jnp.float32)  # the cache layout
  v = jnp.asarray(rng.normal(size=(b, G, s, H)), jnp.float32)
  rows = np.arange(s)
  mask = rows[None, :] <= (offset + np.arange(t))[:, None]
  return q, k, v, jnp.asarray(np.broadcast_to(mask, (b, t, s)))


def case_limits(b, t, s, offset, bandwidth_gbps, rate) -> dict:
  """Floors of one case: the computation's (any implementation) and dense attention's own."""
  cost = limits.attention_cost(b, t, s, G * Q, G, H, offset)
  gflops = rate(min(Q * t, PROBE_ROWS), s)
  compute_s = cost["flops"] / (gflops * 1e9)
  memory_s = cost["io_bytes"] / (bandwidth_gbps * 1e9)
  dense_memory_s = (cost["io_bytes"] + cost["score_bytes"]) / (bandwidth_gbps * 1e9)
  return {
    **cost,
    "matmul_gflops": gflops,
    "memory_floor_s": memory_s,
    "compute_floor_s": compute_s,
    "floor_s": max(memory_s, compute_s),
    "dense_floor_s": max(dense_memory_s, cost["dense_flops"] / (gflops * 1e9)),
  }


def print_table(rows: list[dict], meta: dict) -> None:
  print(
    f"\nload average {meta['load_1m_start']:.2f} at the start, {meta['load_after'][0]:.2f} after;"
    " floors measured in this run"
  )
  print(
    "| case | dense ms | blocked ms | floor ms (memory, compute) | dense / floor"
    " | blocked / floor | dense's own floor ms | dense / own floor | dense as matmuls ms |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  nan = float("nan")
  for r in rows:
    print(
      f"| {r['case']} | {r.get('dense_s', nan) * 1e3:.2f} | {r['blocked_s'] * 1e3:.2f} |"
      f" {r['floor_s'] * 1e3:.3f} ({r['memory_floor_s'] * 1e3:.3f},"
      f" {r['compute_floor_s'] * 1e3:.3f}) | {r.get('dense_vs_floor', nan):.2f}x |"
      f" {r['blocked_vs_floor']:.2f}x | {r['dense_floor_s'] * 1e3:.3f} |"
      f" {r.get('dense_vs_own_floor', nan):.2f}x | {r.get('dense_matmul_s', nan) * 1e3:.2f} |"
    )


def dense_matmul(q, k, v, mask):
  """dense_attention with its one-query (decode) form switched off: batched matmuls."""
  saved = attention_ops.DECODE_REDUCE_MIN_BATCH
  attention_ops.DECODE_REDUCE_MIN_BATCH = 1 << 30
  try:
    return dense_attention(q, k, v, mask)
  finally:
    attention_ops.DECODE_REDUCE_MIN_BATCH = saved


def timed(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip-dense-above-gb", type=float, default=4.0, help="dense would not fit")
  ap.add_argument("--cases", default="", help="comma-separated parts of case names (default all)")
  ap.add_argument("--force", action="store_true")
  ap.add_argument("--out", default="outputs/bench_attention.json")
  args = ap.parse_args()
  run = bench_meta.start(force=args.force)
  bench_meta.print_warning(run.meta)
  jax.config.update("jax_default_matmul_precision", "highest")
  bandwidth = limits.memory_bandwidth()
  print(f"memory bandwidth {bandwidth['bandwidth_gbps']:.1f} GB/s", flush=True)
  probes = {}

  def rate(m, s):
    if (m, s) not in probes:
      probes[m, s] = limits.matmul_gflops(m, H, s)
    return probes[m, s]

  wanted = [w.strip() for w in args.cases.split(",") if w.strip()]
  cases = {n: c for n, c in CASES.items() if not wanted or any(w in n for w in wanted)}
  rng = np.random.default_rng(0)
  dense, blocked = jax.jit(dense_attention), jax.jit(blocked_attention)
  rows = []
  print(
    f"{'case':40} {'dense s':>9} {'blocked s':>9} {'speedup':>8} {'max diff':>9} {'scores GB':>9}"
    f" {'floor s':>9}"
  )
  for name, (b, t, s, offset) in cases.items():
    q, k, v, mask = inputs(rng, b, t, s, offset)
    score_gb = b * G * Q * t * s * 4 / 1e9
    row = dict(case=name, batch=b, queries=t, rows=s, dense_scores_gb=score_gb)
    row["blocked_s"] = timed(blocked, (q, k, v, mask), args.repeats)
    if score_gb <= args.skip_dense_above_gb:
      row["dense_s"] = timed(dense, (q, k, v, mask), args.repeats)
      diff = jnp.abs(dense(q, k, v, mask) - blocked(q, k, v, mask))
      row["max_abs_diff"] = float(jnp.max(diff))
    if t == 1:  # dense's decode form against the batched matmul it replaces at B >= 8
      row["dense_matmul_s"] = timed(jax.jit(dense_matmul), (q, k, v, mask), args.repeats)
    row.update(case_limits(b, t, s, offset, bandwidth["bandwidth_gbps"], rate))
    row["blocked_vs_floor"] = row["blocked_s"] / row["floor_s"]
    if "dense_s" in row:
      row["dense_vs_floor"] = row["dense_s"] / row["floor_s"]
      row["dense_vs_own_floor"] = row["dense_s"] / row["dense_floor_s"]
    rows.append(row)
    d = row.get("dense_s")
    print(
      f"{name:40} {d if d else float('nan'):9.4f} {row['blocked_s']:9.4f}"
      f" {(d / row['blocked_s']) if d else float('nan'):8.2f}"
      f" {row.get('max_abs_diff', float('nan')):9.1e} {score_gb:9.2f} {row['floor_s']:9.5f}",
      flush=True,
    )
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  print_table(rows, meta)
  bench_meta.print_warning(meta)
  probed = [{"m": m, "k": H, "n": n, "gflops": g} for (m, n), g in probes.items()]
  meta["limits"] = {**bandwidth, "matmul_gflops": probed}
  bench_meta.write(args.out, meta, rows)


if __name__ == "__main__":
  main()
