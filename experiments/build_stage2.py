"""Builds the stage-2 training traces (psynth_jax.train.stage2): the text synthesizer's answers.

  python experiments/build_stage2.py --model ~/.cache/psynth_jax/models/qwen2.5-coder-0.5b-instruct \
    --tasks math_train,mmlu_train,arith_gym --limit 100 --out runs/stage2 [--only-correct] \
    [--budget psynth_jax/configs/qwen2_5_coder_0_5b.py:stage2]

Runs the benchmark protocol's workers and text synthesizer on each task's `limit` train
(and limit/20 validation) problems through the evaluation harness, so rerunning the same
command resumes; then writes train.jsonl / validation.jsonl and the data card to --out.
Train on them as on stage 1 (`--config.data.source=jsonl`).
"""

import argparse

from psynth_jax import compile_cache, configs, load_pretrained
from psynth_jax.eval import harness
from psynth_jax.train import stage1, stage2


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", required=True, help="converted model folder")
  ap.add_argument("--tasks", default="math_train,mmlu_train,arith_gym")
  ap.add_argument("--limit", type=int, default=100, help="train problems per task (seeded draw)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", required=True)
  ap.add_argument("--only-correct", action="store_true", help="keep answers scored 1 only")
  ap.add_argument("--num-workers", type=int, default=3)
  ap.add_argument("--worker-tokens", type=int, default=512)
  ap.add_argument("--answer-tokens", type=int, default=512)
  ap.add_argument("--batch-problems", type=int, default=16)
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
  ap.add_argument(
    "--budget",
    default="",
    metavar="CONFIG",
    help="keep only traces that fit this training config's budgets (path.py[:arg])",
  )
  args = ap.parse_args()
  compile_cache.enable()  # a rerun loads its programs instead of compiling them again
  lm = load_pretrained(args.model, dtype=args.dtype)
  settings = harness.Settings(args.num_workers, args.worker_tokens, args.answer_tokens)
  stage2.build(
    lm,
    [t for t in args.tasks.split(",") if t],
    args.out,
    limit=args.limit,
    seed=args.seed,
    settings=settings,
    only_correct=args.only_correct,
    batch_problems=args.batch_problems,
    fits=stage1.budget_check(configs.load(args.budget)) if args.budget else None,
  )
  print(f"wrote {args.out}/train.jsonl, validation.jsonl, data_card.json, DATA_CARD.md")


if __name__ == "__main__":
  main()
