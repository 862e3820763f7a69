"""Cache-path TTFT alone, by what it runs: naive merge, + LoRA, + LoRA and mapper.

  python experiments/bench_cache_path.py                      # Qwen2.5-Coder-0.5B, K = 3
  python experiments/bench_cache_path.py --model qwen-shape   # its shapes, random bf16 weights
  python experiments/bench_cache_path.py --model tiny --lengths 128   # a smoke run

`bench_ttft.py` times the text path, the cache path and the transformers peer
in one process; this script times only the cache path, in a process of its
own, so that neither path's buffers nor the allocator state of the other
changes it. Per branch length: K branch caches of random tokens
(`encode_branches`), an 80-token synthesizer prompt, warm, median of repeats;
"merge" is re-encode + mapper + merge as a program of its own
(`synthesize(profile=True)`).

Limits measured in the same run sit next to each time (`psynth_jax.eval.limits`):
the TTFT's floor is its prefill's, max((weight bytes [+ the LoRA's] + the merged
rows read + the prompt's rows written) / memory bandwidth, prefill FLOPs (matmuls,
causal attention, LoRA) / matmul GFLOP/s probed at M = prompt tokens); the merge's
floor is its bytes (every branch row read once and written once) / bandwidth. Both
are lower bounds: a program that fused the merge into the prefill would pay only
the prefill's. Refuses to run on a loaded machine (1-minute load > 1.0 at the
start) unless --force, which marks the JSON "forced": true.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

import psynth_jax as ps
from psynth_jax.eval import bench_meta, limits


def load(name: str) -> ps.LanguageModel:
  """qwen-shape (Qwen2.5-0.5B's shapes, random bfloat16), or a `bench_meta.bench_model`."""
  if name == "qwen-shape":
    from bench_ttft import QWEN_SHAPE

    return ps.LanguageModel(ps.init_params(QWEN_SHAPE))
  return bench_meta.bench_model(name)  # qwen or tiny


def print_table(rows: list[dict], meta: dict) -> None:
  print(
    f"\nload average {meta['load_1m_start']:.2f} at the start, {meta['load_after'][0]:.2f} after;"
    " floors measured in this run"
  )
  print(
    "| model | K | L | variant | TTFT ms | floor ms (memory, compute) | TTFT / floor"
    " | merge ms | merge floor ms | merge / floor |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['model']} | {r['K']} | {r['L']} | {r['variant']} | {r['ttft_s'] * 1e3:.1f} |"
      f" {r['ttft_floor_s'] * 1e3:.2f} ({r['ttft_memory_floor_s'] * 1e3:.2f},"
      f" {r['ttft_compute_floor_s'] * 1e3:.2f}) | {r['ttft_vs_floor']:.2f}x |"
      f" {r['merge_s'] * 1e3:.2f} | {r['merge_floor_s'] * 1e3:.3f} | {r['merge_vs_floor']:.1f}x |"
    )


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
  bandwidth = limits.memory_bandwidth()
  print(f"memory bandwidth {bandwidth['bandwidth_gbps']:.1f} GB/s", flush=True)

  lm = load(args.model)
  c = lm.config
  lim = limits.Limits.of(lm.params, bandwidth["bandwidth_gbps"])
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
      branch_rows = int(np.asarray(branches.lengths).sum())
      prefill = lim.prefill([len(prompt)], branch_rows, kwargs.get("lora"))
      merge = lim.merge(branch_rows)
      row = {
        "model": args.model,
        "K": args.k,
        "L": length,
        "variant": name,
        "ttft_s": statistics.median(r.ttft_s for r in results),
        "merge_s": statistics.median(r.stages["reencode_map_merge"] for r in results),
        "ttft_floor_s": prefill["floor_s"],
        "ttft_memory_floor_s": prefill["memory_floor_s"],
        "ttft_compute_floor_s": prefill["compute_floor_s"],
        "matmul_gflops": lim.rate(len(prompt)),
        "merge_floor_s": merge["floor_s"],
      }
      row["ttft_vs_floor"] = row["ttft_s"] / row["ttft_floor_s"]
      row["merge_vs_floor"] = row["merge_s"] / row["merge_floor_s"]
      rows.append(row)
      print(
        f"{args.model} K={args.k} L={length:5d} {name:16s} ttft {1e3 * row['ttft_s']:8.1f} ms"
        f" (floor {1e3 * row['ttft_floor_s']:.2f}, {row['ttft_vs_floor']:.2f}x)"
        f"  merge alone {1e3 * row['merge_s']:6.1f} ms (floor {1e3 * row['merge_floor_s']:.3f})",
        flush=True,
      )
  meta = bench_meta.finish(run)
  bench_meta.print_warning(meta)
  print_table(rows, meta)
  bench_meta.print_warning(meta)
  meta.update(
    prompt_tokens=args.prompt_tokens,
    repeats=args.repeats,
    limits={**bandwidth, "matmul_gflops": lim.rates},
  )
  bench_meta.write(args.out, meta, rows)


if __name__ == "__main__":
  main()
