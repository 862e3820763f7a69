"""Worker time with and without shared-prefix mode, side by side.

  python experiments/bench_workers.py --models tiny,qwen

K workers whose prompts share a P-token prefix (system prompt + task) and
differ in a short suffix (their role). Plain mode prefills K full prompts;
shared-prefix mode prefills the prefix once and the K suffixes on copies of
its cache. Both decode the same new tokens (checked equal). Warm, median of
repeats. Refuses to run on a loaded machine (1-minute load > 1.0 at the start)
unless --force, which marks the JSON "forced": true. Writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import numpy as np

from psynth_jax import run_workers
from psynth_jax.eval import bench_meta
from psynth_jax.eval.ttft import warm_median


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
  rows = []
  for name in args.models.split(","):
    lm = bench_meta.bench_model(name)
    rng = np.random.default_rng(0)
    for p in map(int, args.prefix_tokens.split(",")):
      prefix = rng.integers(100, 500, p).tolist()
      suffixes = rng.integers(100, 500, (args.workers, args.suffix_tokens)).tolist()
      full = [prefix + s for s in suffixes]
      n = args.new_tokens
      same = (
        run_workers(lm, full, n).tokens == run_workers(lm, suffixes, n, shared_prefix=prefix).tokens
      )

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
      )
      rows.append(r)
      print(
        f"{name} K={args.workers} prefix={p}: plain {plain:.3f}s  shared-prefix {shared:.3f}s"
        f"  ({100 * r['saving']:.0f}% less; same tokens: {same})",
        flush=True,
      )
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
