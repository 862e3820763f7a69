"""Builds the stage-1 training traces (psynth_jax.train.stage1) from the offline packages.

  python experiments/build_stage1.py --routes chat_rounds,retrieved_chunks --limit 500 \
    --out runs/stage1 [--path chat_rounds=FILE] [--seed 0]

Then train on them: `python experiments/train.py --config psynth_jax/configs/qwen2_5_coder_0_5b.py
--config.data.source=jsonl --config.data.train_jsonl=runs/stage1/train.jsonl ...`.
"""

import argparse

from psynth_jax.train import stage1


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--routes", default="chat_rounds,retrieved_chunks")
  ap.add_argument("--limit", type=int, default=None, help="train problems per route (seeded draw)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", required=True)
  ap.add_argument("--path", action="append", default=[], metavar="ROUTE=FILE")
  args = ap.parse_args()
  paths = {}
  for item in args.path:
    route, sep, path = item.partition("=")
    if not sep:
      raise SystemExit(f"--path {item!r}: expected ROUTE=FILE")
    paths[route] = path
  routes = [r for r in args.routes.split(",") if r]
  stage1.build(routes, args.out, limit=args.limit, seed=args.seed, paths=paths)
  print(f"wrote {args.out}/train.jsonl, validation.jsonl, data_card.json, DATA_CARD.md")


if __name__ == "__main__":
  main()
