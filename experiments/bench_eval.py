"""Throughput of the batched benchmark path against the per-problem path, side by side.

  python experiments/bench_eval.py --models tiny,qwen --problems 1,4,16

N problems of K = 3 workers each (random prompts of `--prompt-tokens`, `--new-tokens`
each), then one text-synthesis and one cache-synthesis (naive merge) answer per
problem: per-problem path = N runs of `run_workers` + `synthesize_text` +
`synthesize`; batched path = one `run_workers_batch` + one `synthesize_text_batch` +
one `synthesize_batch` (what `psynth eval` does with `batch_problems = N`). Both
decode the same tokens (checked equal). Warm (one untimed run per shape first), median
of repeats; problems/s and generated tokens/s, with the load recorded.

Limits measured in the same run sit next to each time (`psynth_jax.eval.limits`): a
path's floor adds its programs' floors, each max(bytes / memory bandwidth, FLOPs /
matmul GFLOP/s probed at that program's M). A generation program is a prefill
(M = its prompt tokens) and the decode steps its loop ran (M = its batch; each step
a full weight read plus the cache rows), read from the tokens it produced; the cache
synthesis's prefill also reads the merged branch rows (the merge itself is left out,
since a prefill could re-encode the rows as it reads them). The per-problem
path runs 3 N such programs at batch K, 1, 1; the batched path 3 at batch N K, N, N:
"floor_speedup" is the speedup the limits allow. Refuses to run on a loaded machine
(1-minute load > 1.0 at the start) unless --force, which marks the JSON "forced":
true. Writes JSON.

  python experiments/bench_eval.py --models tiny --problems 1,2 --force   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from psynth_jax.eval import bench_meta, limits
from psynth_jax.synthesis import synthesize, synthesize_text
from psynth_jax.synthesis_batch import synthesize_batch, synthesize_text_batch
from psynth_jax.workers import run_workers, run_workers_batch

K = 3
SYNTH_PROMPT = 16  # the cache synthesizer's prompt: the answer's first 16 tokens


def per_problem(lm, problems, answers, new):
  tokens = []
  for prompts, answer in zip(problems, answers, strict=True):
    out = run_workers(lm, prompts, new)
    text = synthesize_text(lm, answer, new)
    cache = synthesize(lm, out.branches, answer[:SYNTH_PROMPT], max_new_tokens=new)
    tokens += [out.tokens, [text.tokens], [cache.tokens]]
  return tokens


def batched(lm, problems, answers, new):
  tokens = []
  outs = run_workers_batch(lm, problems, new)
  texts = synthesize_text_batch(lm, answers, new)
  caches = synthesize_batch(
    lm, [o.branches for o in outs], [a[:SYNTH_PROMPT] for a in answers], None, None, new
  )
  for out, text, cache in zip(outs, texts, caches, strict=True):
    tokens += [out.tokens, [text.tokens], [cache.tokens]]
  return tokens


def path_floor(lim: limits.Limits, problems, answers, tokens, new: int, batched: bool) -> dict:
  """Floor of one path from its inputs and outputs (`per_problem` / `batched`'s tokens)."""
  workers, texts, caches = tokens[0::3], [g[0] for g in tokens[1::3]], [g[0] for g in tokens[2::3]]
  branch_rows = [sum(len(t) for t in w) for w in workers]  # each branch keeps its output rows
  synth = [min(SYNTH_PROMPT, len(a)) for a in answers]

  def programs(problems, workers, answers, texts, synth, caches, branch_rows):
    flat = [t for w in workers for t in w]
    return [
      lim.generation(
        [len(p) for ps in problems for p in ps], limits.decode_steps(flat, new), feed_last=True
      ),
      lim.generation([len(a) for a in answers], limits.decode_steps(texts, new)),
      lim.generation(synth, limits.decode_steps(caches, new), branch_rows),
    ]

  columns = (problems, workers, answers, texts, synth, caches, branch_rows)
  if batched:
    return limits.total(*programs(*columns))
  one = [programs(*[[c[i]] for c in columns]) for i in range(len(problems))]
  return limits.total(*[f for fs in one for f in fs])


def print_table(rows: list[dict], meta: dict) -> None:
  print(
    f"\nload average {meta['load_1m_start']:.2f} at the start, {meta['load_after'][0]:.2f} after;"
    " floors measured in this run"
  )
  print(
    "| model | N | per-problem s | floor s | / floor | batched s | floor s | / floor"
    " | speedup | floor speedup | same tokens |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['model']} | {r['problems']} | {r['per_problem_s']:.3f} |"
      f" {r['per_problem_floor_s']:.4f} | {r['per_problem_vs_floor']:.2f}x |"
      f" {r['batched_s']:.3f} | {r['batched_floor_s']:.4f} | {r['batched_vs_floor']:.2f}x |"
      f" {r['speedup']:.2f}x | {r['floor_speedup']:.2f}x | {r['same_tokens']} |"
    )


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
  bandwidth = limits.memory_bandwidth()
  print(f"memory bandwidth {bandwidth['bandwidth_gbps']:.1f} GB/s", flush=True)
  rows, rates = [], {}
  for name in args.models.split(","):
    lm = bench_meta.bench_model(name)
    lim = limits.Limits.of(lm.params, bandwidth["bandwidth_gbps"])
    rates[name] = lim.rates
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
      for path, out, measured in (("per_problem", single, single_s), ("batched", batch, batch_s)):
        f = path_floor(lim, problems, answers, out, args.new_tokens, path == "batched")
        row[f"{path}_floor_s"] = f["floor_s"]
        row[f"{path}_memory_floor_s"] = f["memory_floor_s"]
        row[f"{path}_compute_floor_s"] = f["compute_floor_s"]
        row[f"{path}_vs_floor"] = measured / f["floor_s"]
      row["floor_speedup"] = row["per_problem_floor_s"] / row["batched_floor_s"]
      rows.append(row)
      print(
        f"{name} N={n:3d}: per-problem {single_s:7.2f}s (floor {row['per_problem_floor_s']:.3f}),"
        f" batched {batch_s:7.2f}s (floor {row['batched_floor_s']:.3f})"
        f" ({row['speedup']:.2f}x, floors {row['floor_speedup']:.2f}x;"
        f" {row['batched_problems_per_s']:.2f} problems/s,"
        f" {row['batched_tokens_per_s']:.0f} tokens/s) same tokens: {row['same_tokens']}",
        flush=True,
      )
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  print_table(rows, meta)
  bench_meta.print_warning(meta)
  meta.update(vars(args))
  meta["limits"] = {**bandwidth, "matmul_gflops": rates}
  bench_meta.write(args.out, meta, rows)


if __name__ == "__main__":
  main()
