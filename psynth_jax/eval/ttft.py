"""Synthesizer TTFT sweep: text concatenation vs branch caches over K branches x L tokens.

For every K (branches) and L (tokens per branch), K branch caches are built by
independent prefill of L random token ids each (`encode_branches`); then, in
the same run, warm (one untimed call per shape) and the median of `repeats`:

* text path: prefill of [K*L branch tokens + P prompt tokens] + first sample;
* cache path: re-encode + map + merge + prefill of the P prompt tokens + first sample.

TTFT runs from "branch caches ready" to "first token on the host" (DESIGN.md
§2). Token ids go to both paths directly (no tokenizer time on either side;
only the cost matters, so the ids are random). The FLOP-limit ratio is the
text path's prefill FLOPs over the cache path's (matmuls and attention).
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence

import jax
import numpy as np

from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.synthesis import synthesize, synthesize_text
from psynth_jax.workers import encode_branches


def prefill_flops(config: ModelConfig, queries: int, keys_before: int) -> float:
  """Matmul + attention FLOPs of prefilling `queries` tokens after `keys_before` cached rows.

  Only the last position is unembedded (TTFT needs one token).
  """
  c = config
  d, h = c.hidden_size, c.head_dim
  per_token = 2 * (
    d * (c.num_heads + 2 * c.num_kv_heads) * h + c.num_heads * h * d + 3 * d * c.intermediate_size
  )
  matmul = queries * per_token * c.num_layers + 2 * d * c.vocab_size
  # Query j attends to keys_before + j + 1 keys: QK^T and PV, 2 FLOPs per MAC each.
  keys = queries * keys_before + queries * (queries + 1) / 2
  attention = 4 * c.num_heads * h * keys * c.num_layers
  return matmul + attention


def flop_limit_ratio(config: ModelConfig, num_branches: int, length: int, prompt_tokens: int):
  """Text-path prefill FLOPs / cache-path prefill FLOPs for K branches of L tokens."""
  text = prefill_flops(config, num_branches * length + prompt_tokens, 0)
  return text / prefill_flops(config, prompt_tokens, num_branches * length)


def warm_median(fn: Callable[[], float], repeats: int) -> float:
  """One untimed call (compiles), then the median of `repeats` calls."""
  fn()
  return statistics.median(fn() for _ in range(repeats))


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

  Returns:
    One row per (K, L): {"model", "K", "L", "text_ttft_s", "cache_ttft_s",
    "ratio" (text / cache), "flop_limit_ratio", "ratio_vs_limit"}.
  """
  rng = np.random.default_rng(seed)
  low = min(100, lm.config.vocab_size // 4)
  prompt = rng.integers(low, lm.config.vocab_size, prompt_tokens).tolist()
  rows = []
  for k in ks:
    for length in lengths:
      branch_lists = rng.integers(low, lm.config.vocab_size, (k, length)).tolist()
      branches = jax.block_until_ready(encode_branches(lm, branch_lists))
      text_ids = [t for b in branch_lists for t in b] + prompt
      text_fn = functools.partial(synthesize_text, lm, text_ids, max_new_tokens=1)
      cache_fn = functools.partial(
        synthesize, lm, branches, prompt, mapper=mapper, max_new_tokens=1
      )
      text = warm_median(lambda f=text_fn: f().ttft_s, repeats)
      cache = warm_median(lambda f=cache_fn: f().ttft_s, repeats)
      peer_s = None if peer is None else warm_median(peer(branch_lists, prompt), repeats)
      limit = flop_limit_ratio(lm.config, k, length, prompt_tokens)
      rows.append(
        dict(
          model=name,
          K=k,
          L=length,
          text_ttft_s=text,
          cache_ttft_s=cache,
          peer_cache_ttft_s=peer_s,
          ratio=text / cache,
          flop_limit_ratio=limit,
          ratio_vs_limit=text / cache / limit,
        )
      )
      if progress:
        print(
          f"{name} K={k} L={length:5d} text {text * 1e3:8.1f} ms  cache {cache * 1e3:7.1f} ms"
          f"  ratio {text / cache:5.1f}x  FLOP limit {limit:5.1f}x"
          + ("" if peer_s is None else f"  peer cache {peer_s * 1e3:7.1f} ms"),
          flush=True,
        )
  return rows


def format_table(rows: Sequence[dict]) -> str:
  """A markdown table of sweep rows."""
  lines = [
    "| model | K | L | text TTFT ms | cache TTFT ms | ratio | FLOP-limit | ratio/limit |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['K']} | {r['L']} | {r['text_ttft_s'] * 1e3:.1f} |"
      f" {r['cache_ttft_s'] * 1e3:.1f} | {r['ratio']:.2f}x | {r['flop_limit_ratio']:.2f}x |"
      f" {r['ratio_vs_limit']:.2f} |"
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
