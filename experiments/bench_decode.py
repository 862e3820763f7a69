"""Prefill and decode throughput: psynth_jax vs transformers `generate`, side by side.

  python experiments/bench_decode.py                 # tiny + Qwen2.5-Coder-0.5B
  python experiments/bench_decode.py --models tiny   # no real weights needed
  python experiments/bench_decode.py --models qwen-shape --batches 1,3,16   # a GPU box

`qwen-shape` is Qwen2.5-0.5B's architecture with random weights that transformers
initialises (seed 0) and both implementations load from the same folder: the case for a
machine without the real weights (an accelerator with no network). On a GPU both run
there (transformers on "cuda", jax on its default backend).

Both implementations get the same weights, the same prompts (32 tokens) and
greedy decoding; their token outputs are checked equal (fp32). Each runs in fp32 and
bf16 (transformers bf16 is what a user of an AMX CPU would pick). Prefill time is
the time to the first generated token; decode tokens/s is measured as
(N - 1) / (t(N) - t(1)) from two runs with N and 1 new tokens, with stop
tokens disabled. Warm (compiled) runs, median of repeats.

`--impls` picks rows (default all four); "psynth_jax fp32 matmul-decode" is psynth_jax fp32
with the one-query attention step as a batched matmul at every batch size (the form used
below `attention_ops.DECODE_REDUCE_MIN_BATCH`): the whole-step A/B of the decode form.
Its decode time per step is (t(N) - t(1)) / (N - 1), so a long prompt's prefill noise
swamps it (a 42 s prefill varying by 1 s moves a 16-token step by ~70 ms): time long
caches with `bench_decode_forms.py`, which times steps over a filled cache, no prefill.
Without "transformers fp32" no tokens are compared and no speedup is printed.

Limits measured in the same run sit next to each time (`psynth_jax.eval.limits`,
the formula every benchmark states its floors with): a decode step's floor is
max((weight bytes, an untied unembedding counted, + the KV rows its B tokens
read and write) / memory bandwidth, its FLOPs (matmuls, causal attention over
each token's context) / matmul GFLOP/s probed at M = B), averaged over the N - 1
timed steps (`Limits.decode`); the prefill's likewise at M = B * prompt tokens
(`Limits.prefill`). Each row uses its own library's numbers: its weight bytes,
its dtype (KV rows, probe) and its matmul probe (XLA's; oneDNN's for
transformers, `Limits.of_torch`). "decode_weight_floor_ms" stays the weights
alone / bandwidth. Refuses to run on a loaded machine (1-minute load > 1.0 at
the start) unless --force, which marks the JSON "forced": true. Writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_decode_forms import form

from psynth_jax import load_pretrained
from psynth_jax.eval import bench_meta, limits

IMPLS = (
  "transformers fp32",
  "transformers bf16",
  "psynth_jax fp32",
  "psynth_jax bf16",
  "psynth_jax fp32 matmul-decode",
)


def _median_time(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _bench(generate, prompts, new_tokens: int, repeats: int) -> dict:
  t1 = _median_time(lambda: generate(prompts, 1), repeats)
  tn = _median_time(lambda: generate(prompts, new_tokens), repeats)
  b, p = len(prompts), len(prompts[0])
  step = (tn - t1) / (new_tokens - 1)
  return {
    "prefill_s": t1,
    "prefill_tokens_per_s": b * p / t1,
    "decode_ms_per_step": step * 1e3,
    "decode_tokens_per_s": b / step,
  }


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def psynth_generate(lm):
  def run(prompts, n):
    return lm.generate(prompts, n, stop_ids=())

  return run


def decode_form(impl: str):
  """The one-query attention step as a batched matmul at every B for the matmul-decode row."""
  return form("matmul") if impl.endswith("matmul-decode") else contextlib.nullcontext()


def hf_generate(model):
  def run(prompts, n):
    ids = torch.tensor(prompts, device=model.device)
    with torch.inference_mode():
      out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )
    return out[:, ids.shape[1] :].tolist()

  return run


def tiny_models(tmp: Path):
  """A random tiny Llama built by transformers, loaded by both."""
  from psynth_jax.testing import tiny_llama_hf

  hf = tiny_llama_hf(max_position_embeddings=1024)
  hf.save_pretrained(tmp / "tiny")
  return load_pretrained(tmp / "tiny"), load_pretrained(tmp / "tiny", dtype="bfloat16"), hf


def qwen_models():
  from psynth_jax.convert.weights import fetch_qwen_coder, qwen_coder_transformers

  folder = fetch_qwen_coder()
  hf = qwen_coder_transformers()
  return load_pretrained(folder), load_pretrained(folder, dtype="bfloat16"), hf


def qwen_shape_models(tmp: Path):
  """Qwen2.5-0.5B's architecture, random weights (transformers' init, seed 0), both loaded
  from one saved folder: no download needed."""
  from transformers import Qwen2Config, Qwen2ForCausalLM

  config = Qwen2Config(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
  )
  torch.manual_seed(0)
  hf = Qwen2ForCausalLM(config).eval()
  hf.save_pretrained(tmp / "qwen-shape")
  folder = tmp / "qwen-shape"
  return load_pretrained(folder), load_pretrained(folder, dtype="bfloat16"), hf


def models(name: str, tmp: Path):
  """(psynth_jax fp32, psynth_jax bf16, transformers fp32) with the same weights."""
  if name == "tiny":
    return tiny_models(tmp)
  if name == "qwen-shape":
    return qwen_shape_models(tmp)
  if name == "qwen":
    return qwen_models()
  raise SystemExit(f"unknown model {name!r}; expected tiny, qwen or qwen-shape")


def row_limits(lim: limits.Limits, b: int, p: int, new_tokens: int, times: dict) -> dict:
  """Floors of the prefill of B prompts of P tokens and of the N - 1 decode steps after it.

  `lim` holds the row's library's numbers (`Limits.of` / `Limits.of_torch`);
  `times` is `_bench`'s result, for the measured / floor ratios.
  """
  steps = new_tokens - 1  # the prefill samples the first token
  prefill = lim.prefill([p] * b)
  decode = lim.decode([p] * b, steps)
  per_step = {k: v / steps for k, v in decode.items()}  # the mean step the timing measures
  return {
    "weight_read_bytes": lim.weight_bytes,
    "matmul_gflops_decode": lim.rate(b),
    "matmul_gflops_prefill": lim.rate(b * p),
    "decode_bytes_per_step": per_step["bytes"],
    "decode_flops_per_step": per_step["flops"],
    "decode_weight_floor_ms": lim.weight_bytes / (lim.bandwidth_gbps * 1e9) * 1e3,
    "decode_memory_floor_ms": per_step["memory_floor_s"] * 1e3,
    "decode_compute_floor_ms": per_step["compute_floor_s"] * 1e3,
    "decode_floor_ms_per_step": per_step["floor_s"] * 1e3,
    "decode_vs_floor": times["decode_ms_per_step"] / (per_step["floor_s"] * 1e3),
    "prefill_bytes": prefill["bytes"],
    "prefill_flops": prefill["flops"],
    "prefill_memory_floor_s": prefill["memory_floor_s"],
    "prefill_compute_floor_s": prefill["compute_floor_s"],
    "prefill_floor_s": prefill["floor_s"],
    "prefill_vs_floor": times["prefill_s"] / prefill["floor_s"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,qwen")
  parser.add_argument("--batches", default="1,3")
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--prompt-tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--impls", default=",".join(IMPLS[:4]), help=f"comma-separated of {IMPLS}")
  parser.add_argument("--force", action="store_true", help="run on a loaded machine (marked)")
  parser.add_argument("--out", default="outputs/bench_decode.json")
  args = parser.parse_args()
  chosen = args.impls.split(",")
  if unknown := sorted(set(chosen) - set(IMPLS)):
    raise SystemExit(f"unknown --impls {unknown}; expected some of {IMPLS}")
  run = bench_meta.start(force=args.force)  # before loading anything: that raises the load
  bench_meta.print_warning(run.meta)
  torch.set_num_threads(os.cpu_count() or 1)
  bandwidth = limits.memory_bandwidth()
  bw = bandwidth["bandwidth_gbps"]
  print(f"memory bandwidth {bw:.1f} GB/s", flush=True)

  rows = []
  rates = {}  # {model: {impl: {M: GFLOP/s}}} of the matmul probes, for the JSON
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      lm32, lm16, hf = models(name, Path(tmp))
      hf = hf.to(DEVICE)
      hf16 = copy.deepcopy(hf).to(torch.bfloat16)
      impls = {  # each with its own library's limits: bytes, dtype, matmul probe
        "transformers fp32": (hf_generate(hf), limits.Limits.of_torch(hf, lm32.config, bw)),
        "transformers bf16": (hf_generate(hf16), limits.Limits.of_torch(hf16, lm32.config, bw)),
        "psynth_jax fp32": (psynth_generate(lm32), limits.Limits.of(lm32.params, bw)),
        "psynth_jax bf16": (psynth_generate(lm16), limits.Limits.of(lm16.params, bw)),
        "psynth_jax fp32 matmul-decode": (psynth_generate(lm32), limits.Limits.of(lm32.params, bw)),
      }
      impls = {k: v for k, v in impls.items() if k in chosen}
      rng = np.random.default_rng(0)
      for b in map(int, args.batches.split(",")):
        prompts = rng.integers(100, 500, (b, args.prompt_tokens)).tolist()
        same = None  # the fp32 greedy tokens, compared when transformers fp32 runs
        if "transformers fp32" in impls:
          ours = psynth_generate(lm32)(prompts, args.new_tokens)
          same = ours == hf_generate(hf)(prompts, args.new_tokens)
        for impl, (gen, lim) in impls.items():
          with decode_form(impl):
            r = _bench(gen, prompts, args.new_tokens, args.repeats)
          r.update(model=name, batch=b, impl=impl, greedy_equal_fp32=same)
          r.update(row_limits(lim, b, args.prompt_tokens, args.new_tokens, r))
          rows.append(r)
          print(
            f"{name:5s} B={b} {impl:18s} prefill {r['prefill_s'] * 1e3:8.2f} ms"
            f" ({r['prefill_tokens_per_s']:.1f} tok/s; floor {r['prefill_floor_s'] * 1e3:.2f} ms,"
            f" {r['prefill_vs_floor']:.2f}x)  decode {r['decode_ms_per_step']:.2f} ms/step"
            f" ({r['decode_tokens_per_s']:.1f} tok/s; floor {r['decode_floor_ms_per_step']:.2f},"
            f" {r['decode_vs_floor']:.2f}x)",
            flush=True,
          )
      rates[name] = {impl: lim.rates for impl, (_, lim) in impls.items()}
      del lm32, lm16, hf, hf16, impls

  meta = bench_meta.finish(run)
  print()
  bench_meta.print_warning(meta)
  print(
    f"load average {meta['load_1m_start']:.2f} at the start, {meta['load_after'][0]:.2f} after;"
    " floors measured in this run"
  )
  print(
    "| model | B | impl | prefill tok/s | prefill ms (floor) | prefill / floor | decode tok/s"
    " | ms/step | floor ms/step (memory, compute) | ms/step / floor | decode vs transformers fp32 |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    base = next(
      (
        x
        for x in rows
        if x["model"] == r["model"] and x["batch"] == r["batch"] and x["impl"] == IMPLS[0]
      ),
      None,
    )
    r["decode_speedup_vs_transformers"] = (
      base and r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    )
    speedup = "-" if base is None else f"{r['decode_speedup_vs_transformers']:.2f}x"
    print(
      f"| {r['model']} | {r['batch']} | {r['impl']} | {r['prefill_tokens_per_s']:.1f} |"
      f" {r['prefill_s'] * 1e3:.1f} ({r['prefill_floor_s'] * 1e3:.2f}) |"
      f" {r['prefill_vs_floor']:.2f}x | {r['decode_tokens_per_s']:.1f} |"
      f" {r['decode_ms_per_step']:.2f} | {r['decode_floor_ms_per_step']:.2f}"
      f" ({r['decode_memory_floor_ms']:.2f}, {r['decode_compute_floor_ms']:.2f}) |"
      f" {r['decode_vs_floor']:.2f}x | {speedup} |"
    )
  bench_meta.print_warning(meta)
  meta.update(
    new_tokens=args.new_tokens,
    prompt_tokens=args.prompt_tokens,
    limits={**bandwidth, "matmul_gflops": rates},
  )
  bench_meta.write(args.out, meta, rows)


if __name__ == "__main__":
  main()
