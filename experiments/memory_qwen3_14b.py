"""Memory of the paper's Qwen3-14B training step, per remat policy, from the traced program.

  python experiments/memory_qwen3_14b.py [--out results/memory_qwen3_14b.json]

Nothing is allocated: the base, adapter, mapper and batch are `jax.ShapeDtypeStruct`s at
the shapes of `psynth_jax/configs/qwen3_14b.py`, and `psynth_jax.model.remat.saved_bytes`
counts what the backward pass of `train.step.loss_fn` keeps (beyond the weights, the
batch and the trainables themselves, and beyond the branch caches and the merged cache,
counted once as caches) under each policy. Per-chip figures divide the
weights over fsdp x tensor, the branch caches over the kv heads (tensor) and, where a
residual has a heads / kv-heads / MLP / vocabulary dimension, that residual over tensor
(GSPMD shards those dimensions like the weights that make them); the rest is replicated.
The transient is the working set of one layer's recomputed attention in the backward
(scores, probabilities and their cotangent in float32), which every policy but "none"
holds for one layer at a time.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from psynth_jax.configs import qwen3_14b
from psynth_jax.mapper import Mapper
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.remat import POLICIES, nbytes, residuals
from psynth_jax.model.transformer import abstract_params
from psynth_jax.train import step as step_lib
from psynth_jax.train.batching import Batch

GB = 1e9


def abstract_batch(c, b: int) -> Batch:
  k, s, t, y = c.max_branches, c.branch_tokens, c.synth_tokens, c.target_tokens
  i32, f32, bool_ = jnp.int32, jnp.float32, jnp.bool_
  sds = jax.ShapeDtypeStruct
  return Batch(
    branch_tokens=sds((b, k, s), i32),
    branch_mask=sds((b, k, s), bool_),
    branch_start=sds((b, k), i32),
    num_workers=sds((b,), i32),
    tokens=sds((b, t), i32),
    mask=sds((b, t), bool_),
    score_pos=sds((b, y), i32),
    labels=sds((b, y), i32),
    weights=sds((b, y), f32),
    skipped=sds((b,), i32),
  )


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="results/memory_qwen3_14b.json")
  args = ap.parse_args()

  cfg = qwen3_14b.get_config()
  model = qwen3_14b.model_config()
  tensor, chips = cfg.mesh.shape[2], 32  # the docstring's v5p-64 slice: fsdp 8 x tensor 4
  base = abstract_params(model)
  lora = jax.eval_shape(
    lambda: LoRAWeights.init(model, LoRAConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha), seed=0)
  )
  mapper = jax.eval_shape(lambda: Mapper.create("affine", model.num_layers, seed=0))
  trainables = {"mapper": mapper, "lora": lora}
  batch = abstract_batch(cfg.batch, 1)  # one example per fsdp shard (per_device_batch_size 1)
  key = jax.random.key(0)

  weights = sum(nbytes(x) for x in jax.tree.leaves(base))
  trainable = sum(nbytes(x) for x in jax.tree.leaves(trainables))
  kv_row = (
    model.num_layers * 2 * model.num_kv_heads * model.head_dim * np.dtype(model.dtype).itemsize
  )
  c = cfg.batch
  rows, t = c.branch_rows, c.synth_tokens
  # Worker-side branch caches [K, S] plus the merged, mapped cache [rows + T] of one example.
  caches = (c.max_branches * c.branch_tokens + rows + t) * kv_row
  transient = 3 * model.num_heads * t * (rows + t) * 4

  table = []
  for policy in POLICIES:
    config = step_lib.StepConfig(branch_rows=rows, remat=policy)
    t0 = time.perf_counter()

    def loss(trainables, base, batch, config=config):
      return step_lib.loss_fn(trainables, base, batch, key, config)[0]

    total, per_chip = _residuals(loss, (trainables, base, batch), model, tensor)
    row = dict(
      policy=policy,
      residuals_gb=total / GB,
      residuals_per_chip_gb=per_chip / GB,
      transient_per_chip_gb=(0 if policy == "none" else transient / tensor) / GB,
      trace_s=time.perf_counter() - t0,
    )
    row["per_chip_gb"] = (
      weights / chips
      + 4 * trainable  # replicated: the trainables, their gradient, Adam's two moments
      + caches / tensor
      + per_chip
      + (0 if policy == "none" else transient / tensor)
    ) / GB
    table.append(row)
    print(
      f"{policy:>14}: residuals {row['residuals_gb']:7.2f} GB/example,"
      f" {row['residuals_per_chip_gb']:6.2f} GB/chip; per chip in all {row['per_chip_gb']:6.2f} GB"
      f"  (traced in {row['trace_s']:.0f}s)",
      flush=True,
    )

  out = dict(
    model="Qwen3-14B shapes (bfloat16)",
    batch=dict(c),
    mesh=dict(chips=chips, tensor=tensor, fsdp=chips // tensor),
    weights_gb=weights / GB,
    weights_per_chip_gb=weights / chips / GB,
    trainables_gb=trainable / GB,
    caches_per_example_gb=caches / GB,
    attention_transient_per_example_gb=transient / GB,
    policies=table,
    jax=jax.__version__,
  )
  print(json.dumps({k: v for k, v in out.items() if k != "policies"}, indent=1, default=str))
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1, default=str)
  print(f"wrote {args.out}")


def _residuals(fn, args, model, tensor) -> tuple[int, float]:
  """(bytes kept for the backward, per chip), caches left out: they are counted as caches.

  A residual ending in [kv heads, head dim] is a branch cache or the merged cache itself
  (the merge's and the layers' own inputs), which live through the step anyway.
  """
  sharded = {model.num_heads, model.num_kv_heads, model.intermediate_size, model.vocab_size}
  cache_tail = (model.num_kv_heads, model.head_dim)
  kept = [x for x in residuals(fn, *args, argnums=(0,)) if tuple(x.shape[-2:]) != cache_tail]
  per_chip = sum(nbytes(x) / (tensor if sharded & set(x.shape) else 1) for x in kept)
  return sum(nbytes(x) for x in kept), per_chip


if __name__ == "__main__":
  main()
