"""Throughput of the batched benchmark path against the per-problem path, side by side.

  python experiments/bench_eval.py --models tiny,qwen --problems 1,4,16

N problems of K = 3 workers each (random prompts of `--prompt-tokens`, `--new-tokens`
each), then one text-synthesis and one cache-synthesis (naive merge) answer per
problem: per-problem path = N runs of `run_workers` + `synthesize_text` +
`synthesize`; batched path = one `run_workers_batch` + one `synthesize_text_batch` +
one `synthesize_batch` (what `psynth eval` does with `batch_problems = N`). Both
decode the same tokens (checked equal). Warm (one untimed run per shape first), median
of repeats; problems/s and generated tokens/s, with the load recorded. Refuses to run
on a loaded machine (1-minute load > 1.0 at the start) unless --force, which marks the
JSON "forced": true. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from psynth_jax.eval import bench_meta
from psynth_jax.synthesis import (
  synthesize,
  synthesize_batch,
  synthesize_text,
  synthesize_text_batch,
)
from psynth_jax.workers import run_workers, run_workers_batch

K = 3


def per_problem(lm, problems, answers, new):
  tokens = []
  for prompts, answer in zip(problems, answers, strict=True):
    out = run_workers(lm, prompts, new)
    text = synthesize_text(lm, answer, new)
    cache = synthesize(lm, out.branches, answer[:16], max_new_tokens=new)
    tokens += [out.tokens, [text.tokens], [cache.tokens]]
  return tokens


def batched(lm, problems, answers, new):
  tokens = []
  outs = run_workers_batch(lm, problems, new)
  texts = synthesize_text_batch(lm, answers, new)
  caches = synthesize_batch(
    lm, [o.branches for o in outs], [a[:16] for a in answers], None, None, new
  )
  for out, text, cache in zip(outs, texts, caches, strict=True):
    tokens += [out.tokens, [text.tokens], [cache.tokens]]
  return tokens


def timed(fn, args, repeats):
  fn(*args)  # compile this shape
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn(*args)
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,qwen")
  parser.add_argument("--problems", default="1,4,16")
  parser.add_argument("--prompt-tokens", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--force", action="store_true", help="run on a loaded machine (marked)")
  parser.add_argument("--out", default="outputs/bench_eval.json")
  args = parser.parse_args()
  run = bench_meta.start(force=args.force)  # before loading anything: that raises the load
  bench_meta.print_warning(run.meta)
  rows = []
  for name in args.models.split(","):
    lm = bench_meta.bench_model(name)
    rng = np.random.default_rng(0)
    high = min(lm.config.vocab_size, 20000)
    for n in map(int, args.problems.split(",")):
      problems = [
        [rng.integers(100, high, args.prompt_tokens + 4 * i).tolist() for i in range(K)]
        for _ in range(n)
      ]
      answers = [rng.integers(100, high, 2 * args.prompt_tokens).tolist() for _ in range(n)]
      inputs = (lm, problems, answers, args.new_tokens)
      single_s, single = timed(per_problem, inputs, args.repeats)
      batch_s, batch = timed(batched, inputs, args.repeats)
      generated = sum(len(t) for group in batch for t in group)
      row = {
        "model": name,
        "problems": n,
        "per_problem_s": single_s,
        "batched_s": batch_s,
        "speedup": single_s / batch_s,
        "batched_problems_per_s": n / batch_s,
        "batched_tokens_per_s": generated / batch_s,
        "per_problem_tokens_per_s": generated / single_s,
        "same_tokens": single == batch,
      }
      rows.append(row)
      print(
        f"{name} N={n:3d}: per-problem {single_s:7.2f}s, batched {batch_s:7.2f}s"
        f" ({row['speedup']:.2f}x; {row['batched_problems_per_s']:.2f} problems/s,"
        f" {row['batched_tokens_per_s']:.0f} tokens/s) same tokens: {row['same_tokens']}",
        flush=True,
      )
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  meta.update(vars(args))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
