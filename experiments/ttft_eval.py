"""Synthesizer TTFT on real benchmark problems: an idle pass over recorded `psynth eval` runs.

  python experiments/ttft_eval.py --model ~/.cache/psynth_jax/models/qwen2.5-coder-0.5b-instruct \
    --workdirs results/eval/qwen05_gsm8k,results/eval/qwen05_humaneval,results/eval/qwen05_mbpp \
    --problems 10 --out results/eval/ttft_idle.json

The accuracy runs batch their answers, so they carry no TTFT. This pass takes the
first `--problems` recorded problems of each workdir, rebuilds their workers'
branch caches from the recorded ids (`harness.recorded_branches`, as a resumed
run does) and times each mode's first token on the very prompts the run used
(`workflow.time_modes`: one untimed call, then the median of `--repeats`, each
stopped after its first token, with the cache capacity of the run's answer
budget). Single agent and text synthesis prefill their whole prompt; the naive
merge re-encodes and merges the branch caches and prefills its own prompt.

Next to each time: its floor in this run (`limits.Limits.prefill`, as every
benchmark states it), the larger of the bytes the prefill must move (weights, the
cached rows it reads, the rows it writes) at the measured bandwidth and its causal
FLOPs at the matmul rate measured at its own M, at the model's own MLP shapes. The
naive merge's re-encoding is left out of its floor (a prefill could rotate rows as it
reads them), so it is a lower bound. Refuses a loaded machine (1-minute load > 1.0) unless --force
(marked). Writes JSON (per-problem rows, per-dataset medians, meta).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from psynth_jax.eval import bench_meta, harness, limits, workflow

MODES = (workflow.SINGLE_AGENT, workflow.TEXT_SYNTHESIS, workflow.CacheMode(workflow.NAIVE_MERGE))


def recorded_problems(task, workdir: str, n: int):
  """The first n problems with recorded workers, in record order: (problem, worker row)."""
  rows = harness.read_records(os.path.join(workdir, harness.RECORDS))
  workers, _ = harness.by_problem(rows)
  by_id = {p.id: p for p in task.load()}
  missing = [i for i in workers if i not in by_id]
  if missing:
    raise ValueError(f"{workdir}: recorded ids not in {task.name}: {missing[:3]}")
  ids = list(workers)[:n]
  if len(ids) < n:
    raise ValueError(f"{workdir} has {len(ids)} recorded problems, fewer than --problems {n}")
  return [(by_id[i], workers[i]) for i in ids]


def time_dataset(lm, workdir, n, repeats, lim: limits.Limits) -> list[dict]:
  from psynth_jax import tasks

  info = json.loads(Path(workdir, harness.RUN).read_text())
  if info["fingerprint"] != lm.params.fingerprint:
    raise ValueError(f"{workdir} was recorded with other weights ({info['fingerprint']})")
  task = tasks.get(info["task"])
  budget = info["settings"]["answer_tokens"]
  out = []
  for i, (problem, row) in enumerate(recorded_problems(task, workdir, n)):
    branches = harness.recorded_branches(lm, task, row)
    branch_tokens = int(branches.lengths.sum())
    times = workflow.time_modes(lm, task, problem, row["outputs"], branches, MODES, repeats, budget)
    for name, t in times.items():
      before = branch_tokens if name == workflow.NAIVE_MERGE else 0
      t["floor_s"] = lim.prefill([t["prompt_tokens"]], before)["floor_s"]
    out.append(
      {"task": task.name, "id": problem.id, "branch_tokens": branch_tokens, "modes": times}
    )
    text, cache = times[workflow.TEXT_SYNTHESIS], times[workflow.NAIVE_MERGE]
    print(
      f"  {task.name} {i + 1}/{n} {problem.id}: branches {branch_tokens} tokens | text"
      f" {1e3 * text['ttft_s']:.0f} ms | cache {1e3 * cache['ttft_s']:.0f} ms",
      flush=True,
    )
  return out


def summary(rows: list[dict]) -> dict:
  out = {}
  for task in dict.fromkeys(r["task"] for r in rows):
    mine = [r for r in rows if r["task"] == task]
    modes = {}
    for name in mine[0]["modes"]:
      vals = [r["modes"][name] for r in mine]
      modes[name] = {
        k: statistics.median(v[k] for v in vals)
        for k in ("ttft_s", "floor_s", "prompt_tokens", "tokenize_s")
      }
      modes[name]["vs_text"] = statistics.median(
        v["ttft_s"] / r["modes"][workflow.TEXT_SYNTHESIS]["ttft_s"]
        for v, r in zip(vals, mine, strict=True)
      )
    branch = statistics.median(r["branch_tokens"] for r in mine)
    out[task] = {"problems": len(mine), "branch_tokens": branch, "modes": modes}
  return out


def format_table(summ: dict) -> str:
  head = (
    f"{'dataset':<11}{'mode':<16}{'prompt tok':>11}{'TTFT ms':>9}{'floor ms':>10}"
    f"{'/floor':>8}{'vs text':>9}"
  )
  lines = [head, "-" * len(head)]
  for task, s in summ.items():
    for name, m in s["modes"].items():
      lines.append(
        f"{task:<11}{name:<16}{m['prompt_tokens']:>11.0f}{1e3 * m['ttft_s']:>9.1f}"
        f"{1e3 * m['floor_s']:>10.1f}{m['ttft_s'] / m['floor_s']:>7.2f}x{m['vs_text']:>8.2f}x"
      )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="the converted model the runs used")
  parser.add_argument("--workdirs", required=True, help="comma-separated `psynth eval` workdirs")
  parser.add_argument("--problems", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--force", action="store_true", help="run on a loaded machine (marked)")
  parser.add_argument("--out", default="outputs/ttft_eval.json")
  args = parser.parse_args()
  run = bench_meta.start(force=args.force)  # before loading anything: that raises the load
  bench_meta.print_warning(run.meta)
  from psynth_jax import load_pretrained

  lm = load_pretrained(os.path.expanduser(args.model))
  bandwidth = limits.memory_bandwidth()["bandwidth_gbps"]
  lim = limits.Limits.of(lm.params, bandwidth)
  print(f"bandwidth {bandwidth:.1f} GB/s", flush=True)
  rows = []
  for workdir in args.workdirs.split(","):
    rows += time_dataset(lm, workdir, args.problems, args.repeats, lim)
  meta = bench_meta.finish(run)
  summ = summary(rows)
  print()
  bench_meta.print_warning(meta)
  print(format_table(summ))
  limits_info = {
    "bandwidth_gbps": bandwidth,
    "matmul_gflops": lim.rates,
    "weight_bytes": lim.weight_bytes,
  }
  result = {"meta": meta, "limits": limits_info, "summary": summ, "rows": rows}
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
