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

Memory per device, bf16 (`inference_memory()`, one problem at a time, a 512-token
prompt; GB = 1e9 bytes):

  weights (29.5 GB in all)                       3.69
  workers: prompt + 4096 rows x 3 (the caches)   0.28, prefill scores 0.14
  branch caches kept, 3 x 4096 rows              0.25
  cache synthesis: merged cache, 16,896 rows     0.35, prefill scores 0.17
  text synthesis: its cache, 16,896 rows         0.35, prefill scores 4.33
  peak (text synthesis's prefill)                8.62

A v5e chip has 16 GB and an H100 80 GB. The peak is the text baseline's prefill of the
12,800 pasted worker tokens at once: its float32 attention scores over all 16,896 rows
(XLA may hold two such tensors, about 13 GB on a v5e chip): keep `batch_problems=1` on
a v5e-8; on 8 H100s `--set batch_problems=4` fits. Parallel-Synthesis' own peak is
4.46 GB: it never prefills the worker text.
"""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from psynth_jax.configs import eval as eval_config
from psynth_jax.configs import qwen3_14b
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
    batch_problems=1,
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
  largest activation of a prefill). Everything but the weights scales with
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
    return n * heads * queries * rows * 4 / tensor / GB

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
