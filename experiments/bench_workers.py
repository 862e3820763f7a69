"""Worker time with and without shared-prefix mode, side by side.

  python experiments/bench_workers.py --models tiny,qwen
  python experiments/bench_workers.py --models tiny --prefix-tokens 64 --force   # a smoke run

K workers whose prompts share a P-token prefix (system prompt + task) and
differ in a short suffix (their role). Plain mode prefills K full prompts;
shared-prefix mode prefills the prefix once and the K suffixes on copies of
its cache. Both decode the same new tokens (checked equal). Warm, median of
repeats.

Limits measured in the same run sit next to each time (`psynth_jax.eval.limits`):
a mode's floor adds its programs' floors, each max(bytes / memory bandwidth,
FLOPs / matmul GFLOP/s probed at that program's M): plain = a prefill of K full
prompts (M = K (P + S)); shared-prefix = a prefill of the prefix (M = P) and one of
the K suffixes over it (M = K S); then in both the decode steps the loop ran
(M = K; each a full weight read plus the cache rows) and the feed of the last
token. Refuses to run on a loaded machine (1-minute load > 1.0 at the start)
unless --force, which marks the JSON "forced": true. Writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from psynth_jax import run_workers
from psynth_jax.eval import bench_meta, limits
from psynth_jax.eval.ttft import warm_median


def mode_floors(lim: limits.Limits, k: int, p: int, s: int, steps: int) -> dict[str, dict]:
  """Floors of both modes for K workers of a P-token prefix + S-token suffix, `steps` decode steps."""
  decode = lim.decode([p + s] * k, steps)
  feed = lim.decode([p + s + steps] * k, 1, unembed=False)  # the last token's cache row
  return {
    "plain": limits.total(lim.prefill([p + s] * k), decode, feed),
    "shared_prefix": limits.total(lim.prefill([p]), lim.prefill([s] * k, p), decode, feed),
  }


def print_table(rows: list[dict], meta: dict) -> None:
  print(
    f"\nload average {meta['load_1m_start']:.2f} at the start, {meta['load_after'][0]:.2f} after;"
    " floors measured in this run"
  )
  print(
    "| model | K | prefix | suffix | new | plain s | floor s | plain / floor | shared-prefix s"
    " | floor s | shared / floor | saving |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['model']} | {r['K']} | {r['prefix']} | {r['suffix']} | {r['new_tokens']} |"
      f" {r['plain_s']:.3f} | {r['plain_floor_s']:.4f} | {r['plain_vs_floor']:.2f}x |"
      f" {r['shared_prefix_s']:.3f} | {r['shared_prefix_floor_s']:.4f} |"
      f" {r['shared_prefix_vs_floor']:.2f}x | {100 * r['saving']:.0f}% |"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,qwen")
  parser.add_argument("--workers", type=int, default=3)
  parser.add_argument("--prefix-tokens", default="256,1024")
  parser.add_argument("--suffix-tokens", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--force", action="store_true", help="run on a loaded machine (marked)")
  parser.add_argument("--out", default="outputs/bench_workers.json")
  args = parser.parse_args()
  run = bench_meta.start(force=args.force)  # before loading anything: that raises the load
  bench_meta.print_warning(run.meta)
  bandwidth = limits.memory_bandwidth()
  print(f"memory bandwidth {bandwidth['bandwidth_gbps']:.1f} GB/s", flush=True)
  rows, rates = [], {}
  for name in args.models.split(","):
    lm = bench_meta.bench_model(name)
    lim = limits.Limits.of(lm.params, bandwidth["bandwidth_gbps"])
    rates[name] = lim.rates
    rng = np.random.default_rng(0)
    for p in map(int, args.prefix_tokens.split(",")):
      prefix = rng.integers(100, 500, p).tolist()
      suffixes = rng.integers(100, 500, (args.workers, args.suffix_tokens)).tolist()
      full = [prefix + s for s in suffixes]
      n = args.new_tokens
      tokens = run_workers(lm, full, n).tokens
      same = tokens == run_workers(lm, suffixes, n, shared_prefix=prefix).tokens

      def timed(fn):
        def run():
          t0 = time.perf_counter()
          jax.block_until_ready(fn().branches)
          return time.perf_counter() - t0

        return run

      plain_fn = functools.partial(run_workers, lm, full, n)
      shared_fn = functools.partial(run_workers, lm, suffixes, n, shared_prefix=prefix)
      plain = warm_median(timed(plain_fn), args.repeats)
      shared = warm_median(timed(shared_fn), args.repeats)
      r = dict(
        model=name,
        K=args.workers,
        prefix=p,
        suffix=args.suffix_tokens,
        new_tokens=n,
        plain_s=plain,
        shared_prefix_s=shared,
        saving=1 - shared / plain,
        same_tokens=same,
        decode_steps=limits.decode_steps(tokens, n),
      )
      for mode, f in mode_floors(
        lim, args.workers, p, args.suffix_tokens, r["decode_steps"]
      ).items():
        r[f"{mode}_floor_s"] = f["floor_s"]
        r[f"{mode}_memory_floor_s"] = f["memory_floor_s"]
        r[f"{mode}_compute_floor_s"] = f["compute_floor_s"]
        r[f"{mode}_vs_floor"] = r[f"{mode}_s"] / f["floor_s"]
      rows.append(r)
      print(
        f"{name} K={args.workers} prefix={p}: plain {plain:.3f}s (floor {r['plain_floor_s']:.4f})"
        f"  shared-prefix {shared:.3f}s (floor {r['shared_prefix_floor_s']:.4f})"
        f"  ({100 * r['saving']:.0f}% less; same tokens: {same})",
        flush=True,
      )
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  print_table(rows, meta)
  bench_meta.print_warning(meta)
  meta["limits"] = {**bandwidth, "matmul_gflops": rates}
  bench_meta.write(args.out, meta, rows)


if __name__ == "__main__":
  main()
