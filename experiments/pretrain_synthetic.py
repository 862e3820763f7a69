r"""Pretrains the tiny synthetic-suite base model and saves it as a converted model folder.

Run (the shipped model's three phases, about 30, 60 and 50 minutes on 2 CPU
cores, as experiments/reproduce_synthetic.py runs them from psynth_jax/configs/synthetic.py):

  python experiments/pretrain_synthetic.py --out runs/base_phase1
  python experiments/pretrain_synthetic.py --out runs/base_phase2 --init_from runs/base_phase1 \
    --steps 8000 --copy_steps 0 --short_steps 0 --learning_rate 2e-3 --follow_ups 6
  python experiments/pretrain_synthetic.py --out runs/base --init_from runs/base_phase2 \
    --steps 7000 --copy_steps 0 --short_steps 0 --learning_rate 1e-3 --follow_ups 6 \
    --train_examples 60000 --seed 3 --eval_every 1000

Any `PretrainConfig` field is a flag (`--steps 300 --hidden_size 64` for a
quick try). The folder gets psynth_config.json + model.safetensors (load with
`psynth_jax.load_pretrained`), the suite tokenizer, and pretrain_info.json
(config, timings, validation history, test accuracy). Then it prints the
text-synthesis accuracy per family on the test split (gold branches) and, with
`--workflow_examples N`, the single-agent / text / naive-merge table of
`psynth_jax.eval` on N test examples (workers run by the model itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from psynth_jax.tasks import synthetic
from psynth_jax.tasks import synthetic_pretrain as pretrain
from psynth_jax.tasks.synthetic_pretrain import PretrainConfig, pretrain_and_save


def parse_args() -> tuple[argparse.Namespace, PretrainConfig]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/synthetic_base")
  parser.add_argument("--test_examples", type=int, default=600)
  parser.add_argument("--workflow_examples", type=int, default=0)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  for field in dataclasses.fields(PretrainConfig):
    default = field.default
    if isinstance(default, tuple):
      parser.add_argument(f"--{field.name}", type=int, nargs="+", default=list(default))
    else:
      parser.add_argument(f"--{field.name}", type=type(default), default=default)
  args = parser.parse_args()
  config = PretrainConfig.from_dict(
    {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
  )
  return args, config


def main() -> None:
  args, config = parse_args()
  pretrain_and_save(config, args.out, args.test_examples, args.dtype)
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
  print(f"saved to {args.out} ({size / 1e6:.2f} MB)")
  if args.workflow_examples:
    from psynth_jax import load_pretrained
    from psynth_jax.eval import compare

    task = synthetic.TASK
    problems = task.load(split="test", limit=args.workflow_examples, seed=pretrain.EVAL_SEED)
    lm = pretrain.language_model(load_pretrained(args.out).params)
    report = compare.compare_modes(lm, task, problems, lengths=(), ttft_examples=4)
    print(compare.format_table(report))


if __name__ == "__main__":
  main()
