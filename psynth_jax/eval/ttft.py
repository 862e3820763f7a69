"""Synthesizer TTFT sweep: text concatenation vs branch caches over K branches x L tokens.

For every K (branches) and L (tokens per branch), K branch caches are built by
independent prefill of L random token ids each (`encode_branches`); then, in
the same run, warm (one untimed call per shape) and the median of `repeats`:

* text path: prefill of [K*L branch tokens + P prompt tokens] + first sample;
* cache path: re-encode + map + merge + prefill of the P prompt tokens (with
  the synthesizer's LoRA when one is given) + first sample.

TTFT runs from "branch caches ready" to "first token on the host" (see
`psynth_jax/synthesis.py`). Token ids go to both paths directly (no tokenizer time on either side;
only the cost matters, so the ids are random).

Two FLOP ratios sit next to the measured one:

* `flop_limit_ratio`: text-path prefill FLOPs over the cache path's, counting
  matmuls and *causal* attention (query j scores keys_before + j + 1 keys).
  It is what an ideal implementation of each path would do.
* `executed_flop_ratio`: the same for the work this library's programs do.
  `LanguageModel.prepare` pads the T prompt tokens to `decode.bucket(T)` query
  rows and sizes the cache S = bucket(bucket(T) + max_new_tokens); attention
  (`model/attention_ops.py`, as "auto" resolves here) then reads the shortest
  key prefix that holds every visible row, and over it either scores every
  query against every key ("dense") or, above `DENSE_MAX_SCORES`, each chunk of
  512 queries against each 512-row key block one of its queries sees ("blocked":
  whole blocks, so a staircase over the causal triangle, no unwritten capacity).
  So a text prefill of T tokens computes more score entries than the causal
  T(T+1)/2 (`text_attention_excess` in each row: 2.4x / 2.0x / 1.5x at T = 464 /
  1,616 / 3,152, from the diagonal blocks and the bucket's padding); the cache
  path's P prompt rows see nearly every key anyway. A measured ratio above the
  FLOP limit reflects that excess of the text baseline, not a cache path faster
  than its FLOPs allow.

Given the run's limits (`limits.Limits`, measured in the same run), each row
also carries each path's floor, stated as in every benchmark: its prefill's
max((weights + LoRA + KV rows read and written) / bandwidth, FLOPs / the matmul
rate probed at that prefill's M), and TTFT / floor (`path_floors`).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence

import jax
import numpy as np

from psynth_jax import decode
from psynth_jax.eval import limits
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights, target_dims
from psynth_jax.synthesis import synthesize, synthesize_text
from psynth_jax.workers import encode_branches


def _token_flops(config: ModelConfig, lora: LoRAConfig | None = None) -> float:
  """Matmul FLOPs of one token through every layer (+ its LoRA adapters).

  A dense layer's MLP is 3 D F; an expert layer's is its router (D E) and the k experts
  the token is routed to (3 D F_E each): the FLOPs a dropless dispatch needs, not the
  dense reference's E.
  """
  c = config
  d, h = c.hidden_size, c.head_dim
  attention = d * (c.num_heads + 2 * c.num_kv_heads) * h + c.num_heads * h * d
  dense = 3 * d * c.intermediate_size
  experts = d * c.num_experts + 3 * d * c.moe_intermediate_size * c.num_experts_per_tok
  macs = sum(attention + (experts if c.is_moe(i) else dense) for i in range(c.num_layers))
  for target in lora.targets if lora is not None else ():
    d_in, d_out = target_dims(c, target)
    macs += c.num_layers * lora.rank * (d_in + d_out)
  return 2 * macs


def _flops(config: ModelConfig, queries, score_entries, lora) -> float:
  c = config
  matmul = queries * _token_flops(c, lora) + 2 * c.hidden_size * c.vocab_size
  attention = 4 * c.num_heads * c.head_dim * score_entries * c.num_layers  # QK^T and PV
  return matmul + attention


def prefill_flops(
  config: ModelConfig, queries: int, keys_before: int, lora: LoRAConfig | None = None
) -> float:
  """Matmul + causal attention FLOPs of prefilling `queries` tokens after `keys_before` rows.

  Only the last position is unembedded (TTFT needs one token).
  """
  # Query j attends to keys_before + j + 1 keys: QK^T and PV, 2 FLOPs per MAC each.
  keys = queries * keys_before + queries * (queries + 1) / 2
  return _flops(config, queries, keys, lora)


def executed_scores(config: ModelConfig, query_rows: int, key_rows: int, visible: int) -> int:
  """Score entries (per query head and layer) our attention computes for `query_rows`
  queries over `key_rows` cache rows of which the first `visible` are seen, the queries
  being the last `query_rows` of them, causally (a prefill after what the cache holds):
  the key prefix `attention_ops.attention` reads, then dense over it, or blocked over
  the blocks that hold a row some query of a chunk sees (the implementation "auto" picks
  here; `blocked_attention` splits more queries than a block into chunks of a block)."""
  from psynth_jax.model import attention_ops

  sizes = attention_ops.prefix_sizes(query_rows, key_rows)
  n = next((size for size in sizes if size >= visible), sizes[-1])
  g = config.num_kv_heads
  shape = (1, query_rows, g, config.num_heads // g, config.head_dim)
  if attention_ops.resolve("auto", shape, n, config.dtype) != "blocked":
    return query_rows * n
  block = min(attention_ops.BLOCK, n)
  if query_rows <= attention_ops.BLOCK:
    return query_rows * block * -(-visible // block)
  chunk = attention_ops.BLOCK
  total = 0
  for start in range(0, query_rows, chunk):  # each chunk: to its last query's row
    seen = visible - query_rows + min(start + chunk, query_rows)
    total += chunk * block * -(-seen // block)
  return total


def executed_prefill_flops(
  config: ModelConfig, rows: tuple[int, int, int], lora: LoRAConfig | None = None
) -> float:
  """FLOPs our prefill program does for (query rows, key rows, visible rows)."""
  query_rows, key_rows, visible = rows
  return _flops(config, query_rows, executed_scores(config, query_rows, key_rows, visible), lora)


def text_prefill_rows(prompt_tokens: int, max_new_tokens: int = 1) -> tuple[int, int, int]:
  """(query rows, key rows, visible rows) of the text path's prefill (`LanguageModel.prepare`)."""
  rows = decode.bucket(prompt_tokens)
  return rows, decode.bucket(rows + max_new_tokens), rows


def cache_prefill_rows(
  branch_tokens: int, prompt_tokens: int, max_new_tokens: int = 1
) -> tuple[int, int, int]:
  """(query rows, key rows, visible rows) of the cache path's prefill (`synthesis.synthesize`):
  the merged branch rows, then the prompt's."""
  rows, merged = decode.bucket(prompt_tokens), decode.bucket(branch_tokens)
  return rows, merged + decode.bucket(rows + max_new_tokens), merged + rows


def flop_limit_ratio(
  config: ModelConfig,
  num_branches: int,
  length: int,
  prompt_tokens: int,
  lora: LoRAConfig | None = None,
) -> float:
  """Text-path prefill FLOPs / cache-path prefill FLOPs for K branches of L tokens (causal)."""
  text = prefill_flops(config, num_branches * length + prompt_tokens, 0)
  return text / prefill_flops(config, prompt_tokens, num_branches * length, lora)


def executed_flop_ratio(
  config: ModelConfig,
  num_branches: int,
  length: int,
  prompt_tokens: int,
  lora: LoRAConfig | None = None,
) -> float:
  """The same ratio for the work our programs do (`executed_scores`)."""
  text = executed_prefill_flops(config, text_prefill_rows(num_branches * length + prompt_tokens))
  cache = cache_prefill_rows(num_branches * length, prompt_tokens)
  return text / executed_prefill_flops(config, cache, lora)


def text_attention_excess(
  config: ModelConfig, prompt_tokens: int, max_new_tokens: int = 1
) -> float:
  """Score entries the text path's prefill computes / the causal ones `prefill_flops` counts."""
  scores = executed_scores(config, *text_prefill_rows(prompt_tokens, max_new_tokens))
  return scores / (prompt_tokens * (prompt_tokens + 1) / 2)


def warm_median(fn: Callable[[], float], repeats: int) -> float:
  """One untimed call (compiles), then the median of `repeats` calls."""
  fn()
  return statistics.median(fn() for _ in range(repeats))


def path_floors(
  lim: limits.Limits,
  num_branches: int,
  length: int,
  prompt_tokens: int,
  lora: LoRAWeights | None,
  text_ttft_s: float,
  cache_ttft_s: float,
) -> dict:
  """Each path's floor (`Limits.prefill`) next to its TTFT, for one (K, L) row of the sweep."""
  branch_rows = num_branches * length
  paths = {  # name: (TTFT, floor, the matmuls' M)
    "text": (text_ttft_s, lim.prefill([branch_rows + prompt_tokens]), branch_rows + prompt_tokens),
    "cache": (cache_ttft_s, lim.prefill([prompt_tokens], branch_rows, lora), prompt_tokens),
  }
  row = {"weight_floor_s": lim.weight_bytes / (lim.bandwidth_gbps * 1e9)}
  for path, (ttft_s, f, m) in paths.items():
    row[f"{path}_bytes"] = f["bytes"]
    row[f"{path}_flops"] = f["flops"]
    row[f"{path}_matmul_gflops"] = lim.rate(m)
    row[f"{path}_memory_floor_s"] = f["memory_floor_s"]
    row[f"{path}_compute_floor_s"] = f["compute_floor_s"]
    row[f"{path}_floor_s"] = f["floor_s"]
    row[f"{path}_vs_floor"] = ttft_s / f["floor_s"]
  row["cache_merge_floor_s"] = lim.merge(branch_rows)["floor_s"]
  row["floor_ratio"] = row["text_floor_s"] / row["cache_floor_s"]
  return row


def ttft_sweep(
  lm,
  ks: Sequence[int] = (2, 3, 8),
  lengths: Sequence[int] = (128, 512, 1024),
  prompt_tokens: int = 80,
  repeats: int = 5,
  mapper: Mapper | None = None,
  seed: int = 0,
  name: str = "model",
  progress: bool = False,
  peer: Callable[[list[list[int]], list[int]], Callable[[], float]] | None = None,
  lora: LoRAWeights | None = None,
  bandwidth_gbps: float | None = None,
  lim: limits.Limits | None = None,
) -> list[dict]:
  """Warm median TTFT of text vs cache synthesis for every (K, L).

  Args:
    lm: the base `LanguageModel` (no tokenizer needed).
    ks: numbers of branches.
    lengths: tokens per branch.
    prompt_tokens: length P of the synthesizer prompt (the same ids on both paths).
    repeats: timed calls per path and case (after one untimed call).
    mapper: the cache path's mapper (None: the naive merge).
    seed: for the random token ids.
    name: the model's name in the rows.
    progress: print one line per case.
    peer: optional other implementation of the cache path: given the branch
      token lists and the prompt, returns a timed call (seconds); its warm
      median goes into "peer_cache_ttft_s", measured in the same run.
    lora: the cache path's synthesizer LoRA (the paper's PS prefill is the
      adapted one; None: the base model). The text path never has one.
    bandwidth_gbps: the machine's measured memory bandwidth
      (`limits.memory_bandwidth`): shorthand for `lim=limits.Limits.of(lm.params,
      bandwidth_gbps)`.
    lim: the run's `limits.Limits` for `lm` (its matmul rates are probed at each
      path's M as the sweep needs them, and kept in `lim.rates`); when given (or
      `bandwidth_gbps`), every row also gets each path's floor: its prefill's
      (`Limits.prefill`: the text path's K*L + P tokens; the cache path's P
      prompt tokens after the K*L merged rows, with `lora`). The cache path's
      merge has a floor of its own ("cache_merge_floor_s", `Limits.merge`), not
      added to "cache_floor_s": a program that fused it into the prefill would
      pay only the prefill's (as in `experiments/bench_cache_path.py`).

  Returns:
    One row per (K, L): {"model", "K", "L", "text_ttft_s", "cache_ttft_s",
    "peer_cache_ttft_s", "ratio" (text / cache), "flop_limit_ratio",
    "ratio_vs_limit", "executed_flop_ratio", "text_attention_excess"}, and with
    floors also "weight_floor_s" (the base weights read once / bandwidth), per
    path ("text", "cache") "{path}_bytes", "{path}_flops", "{path}_matmul_gflops",
    "{path}_memory_floor_s", "{path}_compute_floor_s", "{path}_floor_s" and
    "{path}_vs_floor" (TTFT / floor), and "cache_merge_floor_s" and
    "floor_ratio" (text floor / cache floor: the speedup the floors allow).
  """
  rng = np.random.default_rng(seed)
  low = min(100, lm.config.vocab_size // 4)
  prompt = rng.integers(low, lm.config.vocab_size, prompt_tokens).tolist()
  lora_config = None if lora is None else lora.config
  if lim is None and bandwidth_gbps:
    lim = limits.Limits.of(lm.params, bandwidth_gbps)
  rows = []
  for k in ks:
    for length in lengths:
      branch_lists = rng.integers(low, lm.config.vocab_size, (k, length)).tolist()
      branches = jax.block_until_ready(encode_branches(lm, branch_lists))
      text_ids = [t for b in branch_lists for t in b] + prompt
      text_fn = functools.partial(synthesize_text, lm, text_ids, max_new_tokens=1)
      cache_fn = functools.partial(
        synthesize, lm, branches, prompt, mapper=mapper, lora=lora, max_new_tokens=1
      )
      text = warm_median(lambda f=text_fn: f().ttft_s, repeats)
      cache = warm_median(lambda f=cache_fn: f().ttft_s, repeats)
      peer_s = None if peer is None else warm_median(peer(branch_lists, prompt), repeats)
      limit = flop_limit_ratio(lm.config, k, length, prompt_tokens, lora_config)
      row = dict(
        model=name,
        K=k,
        L=length,
        text_ttft_s=text,
        cache_ttft_s=cache,
        peer_cache_ttft_s=peer_s,
        ratio=text / cache,
        flop_limit_ratio=limit,
        ratio_vs_limit=text / cache / limit,
        executed_flop_ratio=executed_flop_ratio(lm.config, k, length, prompt_tokens, lora_config),
        text_attention_excess=text_attention_excess(lm.config, len(text_ids)),
      )
      if lim is not None:
        row.update(path_floors(lim, k, length, prompt_tokens, lora, text, cache))
      rows.append(row)
      if progress:
        floor = (
          f"  floors text {row['text_floor_s'] * 1e3:.2f} ms ({row['text_vs_floor']:.2f}x)"
          f" / cache {row['cache_floor_s'] * 1e3:.2f} ms ({row['cache_vs_floor']:.2f}x)"
          if lim is not None
          else ""
        )
        print(
          f"{name} K={k} L={length:5d} text {text * 1e3:8.1f} ms  cache {cache * 1e3:7.1f} ms"
          f"  ratio {text / cache:5.1f}x  FLOP limit {limit:5.1f}x"
          + ("" if peer_s is None else f"  peer cache {peer_s * 1e3:7.1f} ms")
          + floor,
          flush=True,
        )
  return rows


def format_table(rows: Sequence[dict]) -> str:
  """A markdown table of sweep rows (with each path's floor where the rows have one)."""
  floors = all("text_floor_s" in r for r in rows)
  head = "| model | K | L | text TTFT ms | cache TTFT ms | ratio | FLOP-limit | ratio/limit | executed-FLOP ratio |"
  rule = "|---|---|---|---|---|---|---|---|---|"
  if floors:
    head += " text floor ms (memory, compute) | text / floor | cache floor ms (memory, compute) | cache / floor | floor ratio |"
    rule += "---|---|---|---|---|"
  lines = [head, rule]
  for r in rows:
    line = (
      f"| {r['model']} | {r['K']} | {r['L']} | {r['text_ttft_s'] * 1e3:.1f} |"
      f" {r['cache_ttft_s'] * 1e3:.1f} | {r['ratio']:.2f}x | {r['flop_limit_ratio']:.2f}x |"
      f" {r['ratio_vs_limit']:.2f} | {r['executed_flop_ratio']:.2f}x |"
    )
    if floors:
      for path in ("text", "cache"):
        line += (
          f" {r[f'{path}_floor_s'] * 1e3:.2f} ({r[f'{path}_memory_floor_s'] * 1e3:.2f},"
          f" {r[f'{path}_compute_floor_s'] * 1e3:.2f}) | {r[f'{path}_vs_floor']:.2f}x |"
        )
      line += f" {r['floor_ratio']:.2f}x |"
    lines.append(line)
  lines.append(
    "\nFLOP-limit counts causal attention; the text path's prefill scores whole key blocks"
    " per chunk of queries (a staircase over the causal triangle) over padded rows"
    " (executed-FLOP ratio), so ratio/limit > 1 reflects that excess. Floors (each path's"
    " prefill, `limits.Limits`): max((weights + LoRA + KV rows read and written) / bandwidth,"
    " FLOPs / matmul rate at the path's M)."
  )
  return "\n".join(lines)


def plot_sweep(rows: Sequence[dict], path=None):
  """Per model: TTFT (ms) of both paths vs L (left), measured speedup vs FLOP limit (right).

  Returns the matplotlib Figure (shown inline in a notebook); also saved to `path` if given.
  """
  import matplotlib.pyplot as plt

  models = sorted({r["model"] for r in rows})
  fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
  for (ax_ms, ax_ratio), model in zip(axes, models, strict=True):
    for k in sorted({r["K"] for r in rows if r["model"] == model}):
      sel = [r for r in rows if r["model"] == model and r["K"] == k]
      ls = [r["L"] for r in sel]
      ax_ms.plot(ls, [1e3 * r["text_ttft_s"] for r in sel], "o-", label=f"text K={k}")
      ax_ms.plot(ls, [1e3 * r["cache_ttft_s"] for r in sel], "s--", label=f"cache K={k}")
      ax_ratio.plot(ls, [r["ratio"] for r in sel], "o-", label=f"measured K={k}")
      ax_ratio.plot(ls, [r["flop_limit_ratio"] for r in sel], "x--", label=f"FLOP limit K={k}")
    for ax in (ax_ms, ax_ratio):
      ax.set_xscale("log", base=2)
      ax.set_xlabel("branch length L (tokens)")
      ax.legend(fontsize=7)
    ax_ms.set_ylabel("synthesizer TTFT (ms, warm median)")
    ax_ms.set_title(f"{model}: TTFT, text vs cache")
    ax_ratio.set_ylabel("text TTFT / cache TTFT")
    ax_ratio.set_title(f"{model}: speedup vs FLOP limit")
  fig.tight_layout()
  if path is not None:
    fig.savefig(path, dpi=120)
  return fig
