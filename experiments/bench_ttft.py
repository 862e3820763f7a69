"""Synthesizer TTFT: text concatenation vs branch caches, on the same model and caches.

  python experiments/bench_ttft.py                       # tiny + Qwen2.5-Coder-0.5B
  python experiments/bench_ttft.py --models tiny --ks 2,3 --lengths 128,512

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
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from psynth_jax import Mapper, encode_branches, synthesize, synthesize_text


def prefill_flops(config, queries: int, keys_before: int) -> float:
  """Matmul + attention FLOPs of prefilling `queries` tokens after `keys_before` cached rows.

  Only the last position is unembedded (TTFT needs one token).
  """
  c = config
  d, h = c.hidden_size, c.head_dim
  per_token = 2 * (
    d * (c.num_heads + 2 * c.num_kv_heads) * h + c.num_heads * h * d + 3 * d * c.intermediate_size
  )
  matmul = queries * per_token * c.num_layers + 2 * d * c.vocab_size
  # query j attends to keys_before + j + 1 keys: QK^T and PV, 2 FLOPs per MAC each.
  keys = queries * keys_before + queries * (queries + 1) / 2
  attention = 4 * c.num_heads * h * keys * c.num_layers
  return matmul + attention


def _median(fn, repeats: int) -> float:
  fn()
  return statistics.median(fn() for _ in range(repeats))


def hf_cache_ttft(hf, branch_lists, prompt):
  """transformers peer: prefill each branch into a DynamicCache, concatenate, prompt at max L."""
  import torch
  from transformers import DynamicCache

  with torch.inference_mode():
    per_branch = [hf(torch.tensor([b]), use_cache=True).past_key_values for b in branch_lists]

  def run():
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


def load_case(name: str):
  from psynth_jax import load_pretrained

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
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  rows = []
  for name in args.models.split(","):
    lm, hf = load_case(name)
    mapper = Mapper.create(args.mapper, lm.config.num_layers)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 500, args.prompt_tokens).tolist()
    for k in map(int, args.ks.split(",")):
      for length in map(int, args.lengths.split(",")):
        branch_lists = rng.integers(100, 500, (k, length)).tolist()
        branches = jax.block_until_ready(encode_branches(lm, branch_lists))
        text_ids = [t for b in branch_lists for t in b] + prompt
        text_fn = functools.partial(synthesize_text, lm, text_ids, max_new_tokens=1)
        cache_fn = functools.partial(
          synthesize, lm, branches, prompt, mapper=mapper, max_new_tokens=1
        )
        text = _median(lambda f=text_fn: f().ttft_s, args.repeats)
        cache = _median(lambda f=cache_fn: f().ttft_s, args.repeats)
        peer = (
          None if args.no_peer else _median(hf_cache_ttft(hf, branch_lists, prompt), args.repeats)
        )
        flop_ratio = prefill_flops(lm.config, len(text_ids), 0) / prefill_flops(
          lm.config, len(prompt), k * length
        )
        r = dict(
          model=name,
          K=k,
          L=length,
          text_ttft_s=text,
          cache_ttft_s=cache,
          peer_cache_ttft_s=peer,
          ratio=text / cache,
          flop_limit_ratio=flop_ratio,
          ratio_vs_limit=text / cache / flop_ratio,
        )
        rows.append(r)
        peer_s = "-" if peer is None else f"{peer * 1e3:.1f}"
        print(
          f"{name:5s} K={k} L={length:5d} text {text * 1e3:8.1f} ms  cache {cache * 1e3:7.1f} ms  "
          f"peer {peer_s} ms  ratio {r['ratio']:5.1f}x  FLOP limit {flop_ratio:5.1f}x",
          flush=True,
        )

  print(
    "\n| model | K | L | text TTFT ms | cache TTFT ms | transformers cache TTFT ms | ratio | FLOP-limit | ratio/limit |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    peer = "-" if r["peer_cache_ttft_s"] is None else f"{r['peer_cache_ttft_s'] * 1e3:.1f}"
    print(
      f"| {r['model']} | {r['K']} | {r['L']} | {r['text_ttft_s'] * 1e3:.1f} | {r['cache_ttft_s'] * 1e3:.1f} |"
      f" {peer} | {r['ratio']:.2f}x | {r['flop_limit_ratio']:.2f}x | {r['ratio_vs_limit']:.2f} |"
    )
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  meta = {
    "date": time.strftime("%Y-%m-%d"),
    "machine": platform.platform(),
    "cpus": os.cpu_count(),
    "jax": jax.__version__,
    "prompt_tokens": args.prompt_tokens,
    "mapper": args.mapper,
    "repeats": args.repeats,
  }
  (out / "ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  plot(rows, out / "ttft.png")
  print(f"wrote {out}/ttft.json and ttft.png")


def plot(rows, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = sorted({r["model"] for r in rows})
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
  for ax, model in zip(axes[0], models, strict=True):
    for k in sorted({r["K"] for r in rows if r["model"] == model}):
      sel = [r for r in rows if r["model"] == model and r["K"] == k]
      ls = [r["L"] for r in sel]
      ax.plot(ls, [r["ratio"] for r in sel], "o-", label=f"measured K={k}")
      ax.plot(ls, [r["flop_limit_ratio"] for r in sel], "x--", label=f"FLOP limit K={k}")
    ax.set_xlabel("branch length L (tokens)")
    ax.set_ylabel("text TTFT / cache TTFT")
    ax.set_title(f"{model}: synthesizer TTFT speedup")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  main()
