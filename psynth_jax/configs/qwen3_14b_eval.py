r"""Qwen3-14B inference sharded over 8 devices (a TPU v5e-8, or 8 GPUs): the paper's budgets.

  psynth eval --config psynth_jax/configs/qwen3_14b_eval.py:gsm8k \
    --model ~/.cache/psynth_jax/models/qwen3-14b --workdir runs/eval14b/gsm8k \
    --adapter ps=RELEASE_DIR      # judger_lora/ + cache_mapper.pt (psynth_jax.convert.release)

An eval config (`psynth_jax/configs/eval.py`) with a mesh: tensor = 8 over
(data, fsdp, tensor) = (1, 1, 8). 40 query heads, 8 kv heads, F = 17408 and the
vocabulary (151,936) all divide 8, so every projection, the embedding and the
head are split 8 ways, and every cache over its kv heads (one kv head per
device); `load_pretrained(mesh=)` puts each tensor straight into its shards.
K = 3 workers, greedy, 4096 tokens per worker and per answer as the paper.

Memory per device, bf16 (`inference_memory()`, per problem, a 512-token prompt,
attention "auto": blocked beyond 262K scores per kv head; GB = 1e9 bytes):

  weights (29.5 GB in all, once)                 3.69
  workers: prompt + 4096 rows x 3 (the caches)   0.28, prefill attention 0.02
  branch caches kept, 3 x 4096 rows              0.25
  cache synthesis: merged cache, 16,896 rows     0.35, prefill attention 0.005
  text synthesis: its cache, 16,896 rows         0.35, prefill attention 0.13
  peak (text synthesis)                          4.42

A v5e chip has 16 GB, an H100 80 GB: `batch_problems=4` (the default here) peaks at
about 6.6 GB per chip, and 8 H100s take `--set batch_problems=64`. The text baseline's
prefill of the 12,800 pasted worker tokens is the largest step: with dense attention
its float32 scores alone would be 4.3 GB per chip per problem; blocked attention holds
one 512-row key block of them, and cuDNN (GPU) none.
"""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from psynth_jax.configs import eval as eval_config
from psynth_jax.configs import qwen3_14b
from psynth_jax.model.attention_ops import BLOCK, DENSE_MAX_SCORES
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import abstract_params

GB = 1e9


def get_config(task: str = "gsm8k") -> ConfigDict:
  c = eval_config.get_config(task)
  c.update(
    mesh="1,1,8",
    dtype="bfloat16",
    worker_tokens=4096,
    answer_tokens=4096,
    batch_problems=4,
  )
  return c


def inference_memory(
  model: ModelConfig | None = None,
  tensor: int = 8,
  num_workers: int = 3,
  prompt_tokens: int = 512,
  worker_tokens: int = 4096,
  answer_tokens: int = 4096,
  batch_problems: int = 1,
) -> dict[str, float]:
  """GB per device of each stage of `psynth eval` on a (1, 1, tensor) mesh (see above).

  Weights from the model's own parameter shapes; caches at L x 2 x G x H values per row;
  prefill scores are one float32 [heads, prompt, cache rows] tensor per problem (the
  largest activation of a prefill; blocked attention holds one key block of them).
  Everything but the weights scales with
  `batch_problems`.
  """
  model = model or qwen3_14b.model_config()
  item = 2 if model.dtype == "bfloat16" else 4
  weights = sum(x.size for x in jax.tree.leaves(abstract_params(model))) * item
  kv_row = model.num_layers * 2 * model.num_kv_heads * model.head_dim * item
  k, p, w, a, n = num_workers, prompt_tokens, worker_tokens, answer_tokens, batch_problems
  heads = model.num_heads

  def cache(rows):
    return n * rows * kv_row / tensor / GB

  def scores(queries, rows):
    # "auto" attention (attention_ops): dense scores up to DENSE_MAX_SCORES per kv head,
    # beyond that blocked, which holds [heads, queries, BLOCK] float32 at a time.
    dense = (heads // model.num_kv_heads) * queries * rows <= DENSE_MAX_SCORES
    return n * heads * queries * (rows if dense else BLOCK) * 4 / tensor / GB

  synth_rows = k * w + p + a
  out = dict(
    weights=weights / tensor / GB,
    worker_caches=cache(k * (p + w)),
    worker_prefill_scores=scores(k * p, p + w),
    branch_caches=cache(k * w),
    synthesis_cache=cache(synth_rows),
    synthesis_prefill_scores=scores(p, synth_rows),
    text_cache=cache(synth_rows),
    text_prefill_scores=scores(p + k * w, synth_rows),
  )
  out["peak_workers"] = out["weights"] + out["worker_caches"] + out["worker_prefill_scores"]
  out["peak_synthesis"] = (
    out["weights"] + out["branch_caches"] + out["synthesis_cache"] + out["synthesis_prefill_scores"]
  )
  out["peak_text"] = (
    out["weights"] + out["branch_caches"] + out["text_cache"] + out["text_prefill_scores"]
  )
  out["peak"] = max(out["peak_workers"], out["peak_synthesis"], out["peak_text"])
  return out
