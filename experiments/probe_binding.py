"""The binding probe on the shipped synthetic base model (`psynth_jax.eval.probe`).

  python experiments/probe_binding.py --examples 600 --out results/probe_binding.json

Fresh `tools` test examples (seed 1, not the suite's evaluation seed), every value
token of every branch: does its key / value row, per layer, predict its item? Also
the item token's own rows (a control the probe must pass) and chance. Both encodings:
each branch alone from position 0, and the worker's prompt + output (the rows the
suite's workers hand over). Prints a table per encoding and writes JSON. Seconds of
CPU; not a timing benchmark.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from psynth_jax.eval import probe
from psynth_jax.eval.shipped import load_synthetic_base
from psynth_jax.tasks import synthetic


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", type=int, default=600)
  parser.add_argument("--seed", type=int, default=1, help="suite seed of the examples")
  parser.add_argument("--out", default="outputs/probe_binding.json")
  args = parser.parse_args()
  t0 = time.perf_counter()
  lm = load_synthetic_base()
  examples = synthetic.generate("test", args.examples, args.seed, families=["tools"])
  pools = [pool for _, _, pool in synthetic._TOOLS.values()]
  items = [x for pool in pools for x in pool]
  chance = {"tool_known": 1 / max(map(len, pools)), "nothing_known": 1 / len(items)}
  result = {"examples": args.examples, "seed": args.seed, "chance": chance, "encodings": {}}
  for encoding in ("standalone", "worker"):
    layers = {}
    for which in ("value", "item"):
      rows = probe.collect(lm, examples, items, encoding, which)
      layers[which] = probe.probe_layers(rows)
      layers[f"{which}_rows"] = len(rows.labels)
    result["encodings"][encoding] = layers
    print(f"\n{encoding}: {layers['value_rows']} value tokens, held-out accuracy per layer")
    print(f"{'layer':>5} {'value key':>10} {'value val':>10} {'item key':>9} {'item val':>9}")
    for v, i in zip(layers["value"], layers["item"], strict=True):
      print(
        f"{v['layer']:>5} {100 * v['key']:>9.1f}% {100 * v['value']:>9.1f}%"
        f" {100 * i['key']:>8.1f}% {100 * i['value']:>8.1f}%"
      )
  print(
    f"\nchance: {100 * chance['tool_known']:.1f}% knowing the tool,"
    f" {100 * chance['nothing_known']:.1f}% knowing nothing"
  )
  result["seconds"] = time.perf_counter() - t0
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(result, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
