"""Cache-path TTFT alone, by what it runs: naive merge, + LoRA, + LoRA and mapper.

  python experiments/bench_cache_path.py                      # Qwen2.5-Coder-0.5B, K = 3
  python experiments/bench_cache_path.py --model qwen-shape   # its shapes, random bf16 weights

`bench_ttft.py` times the text path, the cache path and the transformers peer
in one process; this script times only the cache path, in a process of its
own, so that neither path's buffers nor the allocator state of the other
changes it. Per branch length: K branch caches of random tokens
(`encode_branches`), an 80-token synthesizer prompt, warm, median of repeats;
"merge" is re-encode + mapper + merge as a program of its own
(`synthesize(profile=True)`). Refuses to run on a loaded machine (1-minute load
> 1.0 at the start) unless --force, which marks the JSON "forced": true.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import jax
import numpy as np

import psynth_jax as ps
from psynth_jax.eval import bench_meta


def load(name: str) -> ps.LanguageModel:
  if name == "qwen-shape":
    from bench_ttft import QWEN_SHAPE

    return ps.LanguageModel(ps.init_params(QWEN_SHAPE))
  if name != "qwen":
    raise ValueError(f"unknown model {name!r}; expected qwen or qwen-shape")
  from psynth_jax.convert.weights import fetch_qwen_coder

  return ps.load_pretrained(fetch_qwen_coder())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="qwen")
  parser.add_argument("--k", type=int, default=3)
  parser.add_argument("--lengths", default="128,512,1024")
  parser.add_argument("--prompt-tokens", type=int, default=80)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--force", action="store_true", help="run on a loaded machine (marked)")
  parser.add_argument("--out", default="outputs/bench_cache_path.json")
  args = parser.parse_args()
  run = bench_meta.start(force=args.force)  # before loading anything: that raises the load
  bench_meta.print_warning(run.meta)

  lm = load(args.model)
  c = lm.config
  variants = {
    "naive merge": {},
    "+ LoRA": {"lora": ps.LoRAWeights.init(c, ps.LoRAConfig())},
    "+ LoRA + mapper": {
      "lora": ps.LoRAWeights.init(c, ps.LoRAConfig()),
      "mapper": ps.Mapper.create("affine", c.num_layers),
    },
  }
  rng = np.random.default_rng(0)
  low = min(100, c.vocab_size // 4)
  prompt = rng.integers(low, c.vocab_size, args.prompt_tokens).tolist()
  rows = []
  for length in map(int, args.lengths.split(",")):
    branch_lists = rng.integers(low, c.vocab_size, (args.k, length)).tolist()
    branches = jax.block_until_ready(ps.encode_branches(lm, branch_lists))
    for name, kwargs in variants.items():

      def call(kwargs=kwargs, branches=branches):
        return ps.synthesize(lm, branches, prompt, max_new_tokens=1, profile=True, **kwargs)

      call()  # compile
      results = [call() for _ in range(args.repeats)]
      row = {
        "model": args.model,
        "K": args.k,
        "L": length,
        "variant": name,
        "ttft_s": statistics.median(r.ttft_s for r in results),
        "merge_s": statistics.median(r.stages["reencode_map_merge"] for r in results),
      }
      rows.append(row)
      print(
        f"{args.model} K={args.k} L={length:5d} {name:16s} ttft {1e3 * row['ttft_s']:8.1f} ms"
        f"  (merge alone {1e3 * row['merge_s']:6.1f} ms)",
        flush=True,
      )
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  meta.update(prompt_tokens=args.prompt_tokens, repeats=args.repeats)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
