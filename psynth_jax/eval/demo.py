"""`psynth demo`: the synthetic reproduction with the models that ship in the package.

Loads the tiny base model and its trained mappers/LoRAs
(`psynth_jax.eval.shipped`), takes the first `--examples` test examples of the
built-in suite, lets the base model run every example's K workers, then answers
each example in every mode from the same worker outputs: single agent, text
synthesis, naive cache merge, mapper only, LoRA only and full
Parallel-Synthesis per mapper. Prints accuracy per family and mode, warm TTFT
per mode, text vs cache TTFT as branches grow, and the figures recorded for the
shipped models on the larger test set; writes `demo.json` and `demo.png`.
Nothing is downloaded. About 80 s on a 2-core CPU (76 s measured), mostly compilation.

The demo is not a benchmark, so it never refuses to run; it records the
machine, the load average before and after and its wall time in the JSON's
"meta", and says in one line when the machine was loaded at the start (its
TTFTs are then not a measurement; `experiments/bench_ttft.py` is).

`--adapter NAME=FOLDER` adds a mode of your own: a trainer export (mapper +
LoRA, e.g. `WORKDIR/export` of `experiments/train.py --config
psynth_jax/configs/synthetic.py`) trained on the shipped base model, scored on the same
worker outputs as every other mode.
"""

from __future__ import annotations

import os
import time


def run(
  num_examples: int = 60,
  lengths=(16, 32, 64, 128),
  ttft_examples: int = 4,
  out: str = "outputs/demo",
  progress: bool = True,
  adapters: dict[str, str] | None = None,
):
  """Runs the comparison; returns the `compare.Report` (also written under `out`).

  `adapters` maps extra mode names to adapter folders for the shipped base model (a
  trainer export, a PEFT folder or a release folder: `convert.release.load_adapter`).
  """
  from psynth_jax.eval import bench_meta

  bench = bench_meta.start(refuse=False)  # first: loading and compiling raise the load
  if line := bench_meta.note(bench.meta):
    print(f"[demo] {line}", flush=True)

  from psynth_jax import tasks
  from psynth_jax.convert.release import load_adapter
  from psynth_jax.eval import compare, shipped, workflow

  t0 = time.perf_counter()
  lm = shipped.load_synthetic_base()
  modes = shipped.load_synthetic_modes(lm.config)
  taken = set(workflow.mode_names(modes))  # the baselines' names too
  for name, folder in (adapters or {}).items():
    if name in taken:
      raise ValueError(f"adapter name {name!r} is taken by a built-in mode; pick another")
    mapper, lora = load_adapter(folder, lm)
    modes.append(workflow.CacheMode(name, mapper=mapper, lora=lora))
  print(
    f"[demo] base model: {lm.params.num_params() / 1e6:.2f}M parameters, {lm.config.num_layers} layers;"
    f" {len(modes)} cache modes; {num_examples} test examples (K = 2-8 workers each)",
    flush=True,
  )
  task = tasks.get("synthetic")
  problems = task.load(split="test", limit=num_examples, seed=0)
  report = compare.compare_modes(
    lm,
    task,
    problems,
    modes,
    ttft_examples=ttft_examples,
    lengths=tuple(lengths),
    progress=progress,
    meta={"source": "psynth demo"},
  )
  report.meta.update(bench_meta.finish(bench))
  print()
  print(compare.format_table(report))
  if line := bench_meta.note(report.meta):
    print(line)
  try:
    recorded = shipped.recorded_results()
  except FileNotFoundError:
    recorded = None
  if recorded:
    n = recorded["eval_examples"]
    print(f"\nrecorded for the shipped models on {n} test examples ({recorded['date']}):")
    for mode, acc in recorded["accuracy"].items():
      print(f"  {mode:<34} {100 * acc['overall']:5.1f}%")
  os.makedirs(out, exist_ok=True)
  compare.write_json(report, os.path.join(out, "demo.json"))
  compare.plot(report, os.path.join(out, "demo.png"))
  print(f"\nwrote {out}/demo.json and {out}/demo.png in {time.perf_counter() - t0:.0f} s")
  return report


def parse_adapters(specs) -> dict[str, str]:
  """["NAME=FOLDER", ...] -> {NAME: FOLDER}, in order; a malformed or repeated name is an error."""
  adapters = {}
  for spec in specs or ():
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
      raise ValueError(f"--adapter takes NAME=FOLDER, got {spec!r}")
    if name in adapters:
      raise ValueError(f"--adapter {name} is given twice")
    adapters[name] = folder
  return adapters


def main(args) -> None:
  lengths = tuple(int(x) for x in args.lengths.split(",") if x)
  run(args.examples, lengths, args.ttft_examples, args.out, adapters=parse_adapters(args.adapter))
