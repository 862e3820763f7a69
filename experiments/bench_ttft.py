"""Synthesizer TTFT: text concatenation vs branch caches, on the same model and caches.

  python experiments/bench_ttft.py                       # tiny + Qwen2.5-Coder-0.5B
  python experiments/bench_ttft.py --models tiny --ks 2,3 --lengths 128,512
  python experiments/bench_ttft.py --models qwen-shape --no-peer   # no download (GPU/TPU)

Models: `tiny` (a random 4-layer Llama, also built in transformers for the peer),
`qwen` (the converted Qwen2.5-Coder-0.5B-Instruct weights, DESIGN.md §4) and
`qwen-shape` (Qwen2.5-0.5B's shapes with random bfloat16 weights: TTFT depends on
shapes, not values, so this times the real model size where the weights are absent).

For every K (branches) and L (tokens per branch): K branch caches are built by
independent prefill of L random tokens each (`encode_branches`); then, warm and
median of repeats, in one run:
* text path: prefill of [K*L branch tokens + S prompt tokens] + first sample;
* cache path (psynth_jax): re-encode + map + merge + prefill of S + first sample;
* cache path (transformers peer): the same computation in PyTorch: per-branch
  `DynamicCache`s concatenated, prompt at position max L_i, first argmax.
TTFT runs from "branch caches ready" to "first token on the host". Token ids
are given directly to both paths (no tokenizer time on either side). The
FLOP-limit ratio counts matmul and attention FLOPs of both prefills.
Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax

from psynth_jax import Mapper, ModelConfig
from psynth_jax.eval.ttft import format_table, plot_sweep, ttft_sweep


def hf_cache_ttft(hf, branch_lists, prompt):
  """transformers peer: prefill each branch into a DynamicCache, concatenate, prompt at max L."""
  import torch
  from transformers import DynamicCache

  with torch.inference_mode():
    per_branch = [hf(torch.tensor([b]), use_cache=True).past_key_values for b in branch_lists]

  def run() -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
      layers = []
      for i in range(len(per_branch[0].layers)):
        k = torch.cat([c.layers[i].keys for c in per_branch], dim=2)
        v = torch.cat([c.layers[i].values for c in per_branch], dim=2)
        layers.append((k, v))
      cache = DynamicCache(layers)
      rows = layers[0][0].shape[2]
      start = max(len(b) for b in branch_lists)
      ids = torch.tensor([prompt])
      pos = torch.arange(start, start + len(prompt))[None]
      mask = torch.ones(1, rows + len(prompt), dtype=torch.long)
      out = hf(ids, past_key_values=cache, position_ids=pos, attention_mask=mask, logits_to_keep=1)
      int(out.logits[0, -1].argmax())
    return time.perf_counter() - t0

  return run


QWEN_SHAPE = ModelConfig(
  model_type="qwen2",
  vocab_size=151936,
  hidden_size=896,
  intermediate_size=4864,
  num_layers=24,
  num_heads=14,
  num_kv_heads=2,
  head_dim=64,
  rope_theta=1e6,
  tie_word_embeddings=True,
  qkv_bias=True,
  dtype="bfloat16",
)


def load_case(name: str):
  """(psynth_jax LanguageModel, transformers peer model or None)."""
  from psynth_jax import LanguageModel, init_params, load_pretrained

  if name == "qwen-shape":
    return LanguageModel(init_params(QWEN_SHAPE)), None
  if name == "tiny":
    import tempfile

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
      vocab_size=512,
      hidden_size=128,
      intermediate_size=384,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=16384,
    )
    hf = LlamaForCausalLM(cfg).eval()
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    return load_pretrained(tmp), hf
  if name != "qwen":
    raise ValueError(f"unknown model {name!r}; expected tiny, qwen or qwen-shape")
  from psynth_jax.convert.weights import fetch_qwen_coder, qwen_coder_transformers

  lm = load_pretrained(fetch_qwen_coder())
  hf = qwen_coder_transformers()
  return lm, hf


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="tiny,qwen")
  parser.add_argument("--ks", default="2,3,8")
  parser.add_argument("--lengths", default="128,512,1024")
  parser.add_argument("--prompt-tokens", type=int, default=80)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--mapper", default="affine", help="mapper kind on the cache path")
  parser.add_argument("--no-peer", action="store_true", help="skip the transformers peer")
  parser.add_argument("--out", default="outputs/bench_ttft")
  args = parser.parse_args()
  if not args.no_peer:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
  rows = []
  for name in args.models.split(","):
    lm, hf = load_case(name)
    rows += ttft_sweep(
      lm,
      ks=[int(k) for k in args.ks.split(",")],
      lengths=[int(n) for n in args.lengths.split(",")],
      prompt_tokens=args.prompt_tokens,
      repeats=args.repeats,
      mapper=Mapper.create(args.mapper, lm.config.num_layers),
      name=name,
      progress=True,
      peer=None if args.no_peer or hf is None else functools.partial(hf_cache_ttft, hf),
    )

  print()
  print(format_table(rows))
  print("\ntransformers cache-path peer (same caches, same prompt), warm median ms:")
  for r in rows:
    if r["peer_cache_ttft_s"] is not None:
      print(
        f"  {r['model']} K={r['K']} L={r['L']}: peer {r['peer_cache_ttft_s'] * 1e3:.1f}"
        f" vs psynth_jax {r['cache_ttft_s'] * 1e3:.1f}"
      )
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
    "jax": jax.__version__,
    "device": jax.devices()[0].device_kind,
    "prompt_tokens": args.prompt_tokens,
    "mapper": args.mapper,
    "repeats": args.repeats,
  }
  (out / "ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  plot_sweep(rows, out / "ttft.png")
  print(f"wrote {out}/ttft.json and ttft.png")


if __name__ == "__main__":
  main()
