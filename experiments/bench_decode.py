"""Prefill and decode throughput: psynth_jax vs transformers `generate`, side by side.

  python experiments/bench_decode.py                 # tiny + Qwen2.5-Coder-0.5B
  python experiments/bench_decode.py --models tiny   # no real weights needed

Both implementations get the same weights, the same prompts (32 tokens) and
greedy decoding; their token outputs are checked equal (fp32). Prefill time is
the time to the first generated token; decode tokens/s is measured as
(N - 1) / (t(N) - t(1)) from two runs with N and 1 new tokens, with stop
tokens disabled. Warm (compiled) runs, median of repeats. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

from psynth_jax import load_pretrained


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


def psynth_generate(lm):
  def run(prompts, n):
    return lm.generate(prompts, n, stop_ids=())

  return run


def hf_generate(model):
  def run(prompts, n):
    ids = torch.tensor(prompts)
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
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  cfg = LlamaConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
  )
  hf = LlamaForCausalLM(cfg).eval()
  hf.save_pretrained(tmp / "tiny")
  return load_pretrained(tmp / "tiny"), load_pretrained(tmp / "tiny", dtype="bfloat16"), hf


def qwen_models():
  from psynth_jax.convert.weights import fetch_qwen_coder, qwen_coder_transformers

  folder = fetch_qwen_coder()
  hf = qwen_coder_transformers()
  return load_pretrained(folder), load_pretrained(folder, dtype="bfloat16"), hf


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,qwen")
  parser.add_argument("--batches", default="1,3")
  parser.add_argument("--new-tokens", type=int, default=32)
  parser.add_argument("--prompt-tokens", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="outputs/bench_decode.json")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      lm32, lm16, hf = tiny_models(Path(tmp)) if name == "tiny" else qwen_models()
      rng = np.random.default_rng(0)
      for b in map(int, args.batches.split(",")):
        prompts = rng.integers(100, 500, (b, args.prompt_tokens)).tolist()
        ours = psynth_generate(lm32)(prompts, args.new_tokens)
        theirs = hf_generate(hf)(prompts, args.new_tokens)
        same = ours == theirs
        for impl, gen in (
          ("transformers fp32", hf_generate(hf)),
          ("psynth_jax fp32", psynth_generate(lm32)),
          ("psynth_jax bf16", psynth_generate(lm16)),
        ):
          r = _bench(gen, prompts, args.new_tokens, args.repeats)
          r.update(model=name, batch=b, impl=impl, greedy_equal_fp32=same)
          rows.append(r)
          print(
            f"{name:5s} B={b} {impl:18s} prefill {r['prefill_tokens_per_s']:8.1f} tok/s  "
            f"decode {r['decode_tokens_per_s']:7.1f} tok/s ({r['decode_ms_per_step']:.1f} ms/step)",
            flush=True,
          )
      del lm32, lm16, hf

  print("\n| model | B | impl | prefill tok/s | decode tok/s | ms/step | decode vs transformers |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    base = next(
      x
      for x in rows
      if x["model"] == r["model"]
      and x["batch"] == r["batch"]
      and x["impl"].startswith("transformers")
    )
    r["decode_speedup_vs_transformers"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    print(
      f"| {r['model']} | {r['batch']} | {r['impl']} | {r['prefill_tokens_per_s']:.1f} |"
      f" {r['decode_tokens_per_s']:.1f} | {r['decode_ms_per_step']:.1f} |"
      f" {r['decode_speedup_vs_transformers']:.2f}x |"
    )
  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "new_tokens": args.new_tokens,
    "prompt_tokens": args.prompt_tokens,
  }
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
