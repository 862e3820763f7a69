r"""Pretrains the tiny synthetic-suite base model and saves it as a converted model folder.

Run (phase 1 of the shipped model, about 28 minutes on 2 CPU cores; phase 2
continues from it, as experiments/reproduce_synthetic.py does):

  python experiments/pretrain_synthetic.py --out runs/base_phase1
  python experiments/pretrain_synthetic.py --out runs/base --init_from runs/base_phase1 \
    --copy_steps 0 --short_steps 0 --learning_rate 2e-3 --follow_ups 6

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
import resource
import time

from psynth_jax.pretrain import PretrainConfig, evaluate, num_params, pretrain, save_base
from psynth_jax.tasks import synthetic


def parse_args() -> tuple[argparse.Namespace, PretrainConfig]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="psynth_jax/assets/synthetic_base")
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
  values = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return args, PretrainConfig(**values)


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main() -> None:
  args, config = parse_args()
  t0, cpu0 = time.perf_counter(), cpu_seconds()
  lm, history = pretrain(config)
  train_wall, train_cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
  print(
    f"pretrained {num_params(lm.params):,} parameters in {train_wall / 60:.1f} min wall"
    f" ({train_cpu / 60:.1f} CPU-min)"
  )

  test = synthetic.generate("test", args.test_examples, config.seed)
  scores = evaluate(lm, test, config.max_new_tokens)
  print(f"test text synthesis ({len(test)} examples, gold branches):")
  for name, acc in scores["text"].items():
    print(f"  {name:<11} {100 * acc:5.1f}%")
  print(f"  workers exact: {100 * scores['worker']['exact']:.1f}%")

  info = {
    "config": dataclasses.asdict(config),
    "num_params": num_params(lm.params),
    "train_wall_s": train_wall,
    "train_cpu_s": train_cpu,
    "cpus": os.cpu_count(),
    "history": history,
    "test": {"num_examples": len(test), "seed": config.seed, **scores},
  }
  save_base(lm, args.out, info, args.dtype)
  size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
  print(f"saved to {args.out} ({size / 1e6:.2f} MB)")

  if args.workflow_examples:
    from psynth_jax.eval import compare

    examples = synthetic.generate("test", args.workflow_examples, config.seed)
    report = compare.compare_modes(lm, examples, lengths=(), ttft_examples=4)
    print(compare.format_table(report))


if __name__ == "__main__":
  main()
