"""Builds the stage-1 training traces (psynth_jax.train.stage1) from the offline packages.

  python experiments/build_stage1.py --limit 500 \
    --out runs/stage1 [--path chat_rounds=FILE] [--seed 0] \
    [--budget psynth_jax/configs/qwen2_5_coder_0_5b.py:stage1]

Then train on them: `python experiments/train.py --config
psynth_jax/configs/qwen2_5_coder_0_5b.py:stage1 --workdir runs/train/stage1` (its budgets are
the ones `--budget` checked; it reads runs/stage1/train.jsonl).
"""

import argparse

from psynth_jax import configs
from psynth_jax.train import stage1


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument(
    "--routes",
    default="chat_rounds,retrieved_chunks,tool_calls,bfcl_calls,in_context,in_context_inverse",
  )
  ap.add_argument("--limit", type=int, default=None, help="train problems per route (seeded draw)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", required=True)
  ap.add_argument("--path", action="append", default=[], metavar="ROUTE=FILE")
  ap.add_argument(
    "--budget",
    default="",
    metavar="CONFIG",
    help="keep only traces that fit this training config's budgets (path.py[:arg])",
  )
  args = ap.parse_args()
  paths = {}
  for item in args.path:
    route, sep, path = item.partition("=")
    if not sep:
      raise SystemExit(f"--path {item!r}: expected ROUTE=FILE")
    paths[route] = path
  routes = [r for r in args.routes.split(",") if r]
  fits = stage1.budget_check(configs.load(args.budget)) if args.budget else None
  stage1.build(routes, args.out, limit=args.limit, seed=args.seed, paths=paths, fits=fits)
  print(f"wrote {args.out}/train.jsonl, validation.jsonl, data_card.json, DATA_CARD.md")


if __name__ == "__main__":
  main()
