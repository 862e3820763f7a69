"""Held-out CE of each arm's cache synthesizer against the text teacher, per route
(psynth_jax.train.heldout).

  python experiments/heldout_ce.py --config psynth_jax/configs/qwen2_5_coder_0_5b.py:stage1 \
    --jsonl runs/stage1/validation.jsonl --adapter ps=runs/train/stage1/export \
    --out results/heldout/stage1.json

The untrained arm (naive merge: re-encoding, no mapper, no LoRA) always runs; each
`--adapter NAME=FOLDER` adds one (a trainer export, a PEFT folder or a reference release),
each `--text-adapter NAME=FOLDER` a text arm (an export of `train.path="text"` or a PEFT
folder), run on the text synthesizer.
Budgets are the config's `batch` (with its `teacher_tokens`, whatever its KL weight).
"""

import argparse
import dataclasses
import json
import os
import time

from psynth_jax import configs, load_pretrained
from psynth_jax.convert.release import load_adapter
from psynth_jax.eval.demo import parse_adapters
from psynth_jax.train import batching, data, heldout, trainer


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True, help="training config, path.py[:arg]")
  ap.add_argument("--jsonl", required=True, help="validation traces")
  ap.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER")
  ap.add_argument("--text-adapter", action="append", default=[], metavar="NAME=FOLDER")
  ap.add_argument("--limit", type=int, default=0, help="first N traces (0: all)")
  ap.add_argument("--batch-size", type=int, default=2)
  ap.add_argument("--out", default="", help="write the result here (JSON)")
  args = ap.parse_args()
  config = configs.load(args.config)
  lm = load_pretrained(os.path.expanduser(config.model.path), config.model.dtype or None)
  spec = dataclasses.replace(trainer.batch_spec(config), teacher_tokens=config.batch.teacher_tokens)
  eos = lm.stop_ids[0] if lm.stop_ids and config.data.append_eos else None
  batcher = batching.Batcher(lm.tokenizer, spec, lm.pad_id, eos)
  arms = {"naive_merge": (None, None)}
  for name, folder in parse_adapters(args.adapter).items():
    arms[name] = load_adapter(folder, lm)
  text_arms = {
    name: load_adapter(folder, lm, synthesizer="text")[1]
    for name, folder in parse_adapters(args.text_adapter).items()
  }
  examples = data.read_jsonl(args.jsonl)
  examples = examples[: args.limit] if args.limit else examples
  t0 = time.perf_counter()
  result = heldout.evaluate(
    lm.params, batcher, examples, arms, text_arms=text_arms, batch_size=args.batch_size
  )
  result.update(
    config=args.config,
    jsonl=args.jsonl,
    adapters=dict(parse_adapters(args.adapter)),
    text_adapters=dict(parse_adapters(args.text_adapter)),
    seconds=round(time.perf_counter() - t0, 1),
    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
  )
  print(heldout.format_table(result, [*text_arms, *arms]))
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
