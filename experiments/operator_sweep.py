"""Merge operators side by side on the synthetic suite: accuracy against counted FLOPs.

  python experiments/operator_sweep.py --examples 300 --families tools \
    --out results/operator_sweep/tools_300_seed2.json

Fresh test examples (`--seed`, not the suite's evaluation seed 0), the shipped
base model runs the workers once (greedy), then every mode answers from the same
worker outputs (`workflow.run_workflow`): single agent, text synthesis, the naive
merge, the shipped trained Parallel-Synthesis adapters, and the training-free
operators (`psynth_jax.operators`): sequential positions, APE settings, selective
recompute at several fractions, each alone and under the trained adapter (its
mapper on the reused rows, its LoRA on the synthesizer). Per mode: accuracy per
family with a 95 % interval, the paired difference to text synthesis (exact
McNemar), and the counted FLOPs to the first token (the operator's merge + the
synthesizer's prefill; text synthesis: its whole prefill), averaged over examples
from the gold branches' shapes. With `--ttft-examples N`, also each mode's warm TTFT
(`workflow.measure_timings`: the median over the first N examples of the median of 3
timed calls, the accuracy run's budgets): a timing, so that run refuses a loaded
machine (1-minute load > 1.0 at the start) unless --force, and the JSON records the
load ("meta"). Writes JSON and a PNG (accuracy vs FLOPs, and vs TTFT where measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from psynth_jax import tasks
from psynth_jax.eval import bench_meta, stats, workflow
from psynth_jax.eval.shipped import load_synthetic_base, load_synthetic_modes
from psynth_jax.eval.ttft import prefill_flops
from psynth_jax.tasks import synthetic
from psynth_jax.train.checkpoints import load_export
from psynth_jax.workers import encode_branches

TRAINED = "parallel_synthesis/head_affine"  # the shipped adapter the combinations use
OPERATORS = (
  "sequential",
  "ape:temperature=0.8",
  "ape:scale=2",
  "recompute:fraction=0.05",
  "recompute:fraction=0.15",
  "recompute:fraction=0.3",
  "recompute:fraction=1",
  "reprefill",
)
UNDER_TRAINED = (
  "recompute:fraction=0.15",
  "recompute:fraction=0.3",
  "ape:temperature=0.8",
  "reprefill",
)


def modes_to_run(
  lm, specs=OPERATORS, under_trained=UNDER_TRAINED, adapters=None
) -> list[workflow.CacheMode]:
  """The shipped modes, the operators alone and under the trained adapter, and each
  `adapters` export (name -> folder; one trained under an operator loads as it)."""
  shipped = {m.name: m for m in load_synthetic_modes(lm.config)}
  modes = [shipped[workflow.NAIVE_MERGE], shipped["parallel_synthesis/affine"], shipped[TRAINED]]
  modes += [workflow.operator_mode(spec, lm.config) for spec in specs]
  ps = shipped[TRAINED]
  for spec in under_trained:
    op = workflow.operator_mode(spec, lm.config).operator.replace(mapper=ps.mapper)
    modes.append(workflow.CacheMode(f"{TRAINED}+{op.name}", lora=ps.lora, operator=op))
  for name, folder in (adapters or {}).items():
    mapper, lora = load_export(folder, lm.config)
    modes.append(workflow.CacheMode(name, mapper=mapper, lora=lora))
  return modes


def counted_flops(lm, task, problems, modes) -> dict[str, float]:
  """Mean FLOPs to the first token per mode, from each problem's gold branch shapes."""
  tok = lm.require_tokenizer()
  c = lm.config
  per_mode = {workflow.SINGLE_AGENT: [], workflow.TEXT_SYNTHESIS: []}
  per_mode.update({m.name: [] for m in modes})
  for p in problems:
    outputs = list(p.meta["branches"])
    ids = [tok.encode(synthetic.branch_as_output(b)) for b in outputs]
    branches = encode_branches(lm, ids)
    total = sum(map(len, ids))
    for name in (workflow.SINGLE_AGENT, workflow.TEXT_SYNTHESIS):
      prompt = workflow.prompt_ids(lm, task, name, p, outputs)[0]
      per_mode[name].append(prefill_flops(c, len(prompt), 0))
    synth = len(workflow.prompt_ids(lm, task, modes[0], p, outputs)[0])
    for m in modes:
      per_mode[m.name].append(m.merge.flops(c, branches) + prefill_flops(c, synth, total))
  return {name: statistics.mean(v) for name, v in per_mode.items()}


def _binary(score: float) -> int:
  if score not in (0, 1):
    raise ValueError(f"the suite scores 0 or 1, got {score}")
  return int(score)


def summarize(records, names, families) -> dict:
  text = [r.scores[workflow.TEXT_SYNTHESIS] for r in records]
  out = {}
  for name in names:
    scores = [r.scores[name] for r in records]
    n, hits = len(scores), sum(scores)
    row = {
      "accuracy": hits / n,
      "interval": stats.wilson_interval(hits, n),
      "families": workflow.accuracy(records, name, families),
    }
    if name != workflow.TEXT_SYNTHESIS:
      row["vs_text"] = stats.mcnemar_exact(scores, text)
    out[name] = row
  return out


def plot(summary: dict, flops: dict, path: Path, ttft: dict | None = None) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  axes_x = [("FLOPs to the first token (counted, mean per example)", flops)]
  if ttft:
    axes_x.append(("TTFT, ms (warm, median)", {n: 1e3 * t["ttft_s"] for n, t in ttft.items()}))
  fig, axes = plt.subplots(1, len(axes_x), figsize=(8 * len(axes_x), 5), squeeze=False)
  for ax, (label, xs) in zip(axes[0], axes_x, strict=True):
    for name, row in summary.items():
      lo, hi = row["interval"]
      acc = 100 * row["accuracy"]
      yerr = [[acc - 100 * lo], [100 * hi - acc]]
      ax.errorbar(xs[name], acc, yerr=yerr, fmt="o", capsize=3)
      ax.annotate(name, (xs[name], acc), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy, % (95 % interval)")
    ax.set_title("merge operators on the synthetic suite (same worker outputs)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", type=int, default=300)
  parser.add_argument("--families", default="", help="comma-separated; default every family")
  parser.add_argument("--seed", type=int, default=2, help="suite seed of the test examples")
  parser.add_argument("--operators", default=";".join(OPERATORS), help="';'-separated specs")
  parser.add_argument(
    "--under-trained", default=";".join(UNDER_TRAINED), help="';'-separated specs, with PS"
  )
  parser.add_argument(
    "--adapter", action="append", default=[], metavar="NAME=EXPORT", help="a trained export"
  )
  parser.add_argument("--out", default="outputs/operator_sweep.json")
  parser.add_argument("--ttft-examples", type=int, default=0, help="time TTFT on this many")
  parser.add_argument("--force", action="store_true", help="time TTFT on a loaded machine")
  args = parser.parse_args()
  run = bench_meta.start(force=args.force, refuse=args.ttft_examples > 0)
  if args.ttft_examples:
    bench_meta.print_warning(run.meta)
  t0 = time.perf_counter()
  lm = load_synthetic_base()
  task = tasks.get("synthetic")
  families = [f for f in args.families.split(",") if f] or list(synthetic.FAMILIES)
  examples = synthetic.generate("test", args.examples, args.seed, families=families)
  problems = [ex.problem() for ex in examples]
  split = lambda text: [x for x in text.split(";") if x]  # noqa: E731
  adapters = dict(a.split("=", 1) for a in args.adapter)
  modes = modes_to_run(lm, split(args.operators), split(args.under_trained), adapters)
  records = workflow.run_workflow(lm, task, problems, modes)
  names = workflow.mode_names(modes)
  summary = summarize(records, names, families)
  flops = counted_flops(lm, task, problems, modes)
  ttft = None
  if args.ttft_examples:
    ttft = workflow.measure_timings(lm, task, problems[: args.ttft_examples], modes)
  print(f"\n{args.examples} test examples (seed {args.seed}), families {', '.join(families)}")
  head = f"{'mode':<56}{'accuracy':>9}{'95% interval':>16}{'vs text p':>11}{'GFLOP':>9}"
  head += f"{'TTFT ms':>9}" if ttft else ""
  print(head + "\n" + "-" * len(head))
  for name in names:
    row = summary[name]
    lo, hi = row["interval"]
    p = f"{row['vs_text']['p_value']:>11.3f}" if "vs_text" in row else f"{'-':>11}"
    print(
      f"{name:<56}{100 * row['accuracy']:>8.1f}% [{100 * lo:5.1f}, {100 * hi:5.1f}]{p}"
      f"{flops[name] / 1e9:>9.3f}" + (f"{1e3 * ttft[name]['ttft_s']:>9.1f}" if ttft else "")
    )
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  result = {
    "examples": args.examples,
    "seed": args.seed,
    "families": families,
    "summary": summary,
    "flops": flops,
    "ttft": ttft,
    "ttft_examples": args.ttft_examples,
    # per example, in generation order: one 0/1 character per example and mode, so any two
    # modes of this file (or of another run with the same examples) can be paired later
    "scores": {n: "".join("01"[_binary(r.scores[n])] for r in records) for n in names},
    "seconds": time.perf_counter() - t0,
    "meta": bench_meta.finish(run),
  }
  out.write_text(json.dumps(result, indent=1))
  plot(summary, flops, out.with_suffix(".png"), ttft)
  print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
  main()
