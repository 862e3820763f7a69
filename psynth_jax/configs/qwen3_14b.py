"""The paper's recipe: Qwen3-14B synthesizer LoRA + mapper on a TPU pod slice.

Backbone Qwen3-14B (40 layers, 40 query / 8 kv heads, D 5120), frozen and in
bfloat16; LoRA rank 16, alpha 32, dropout 0 on q/k/v/o; the length-aware affine
mapper; AdamW lr 1e-4, no weight decay, no schedule, one epoch; token-budget
guards that skip oversize examples. Stage 1 (general mix) and stage 2
(text-synthesis trajectories) are two runs: the second starts from the first's
export (`--config.data.train_jsonl` of the stage-2 traces).

Mesh for a v5p-64 slice (32 chips, 4 hosts; v4-64 alike): tensor 4 (40 heads,
8 kv heads, F 17408 and the vocabulary all divide), fsdp over the remaining 8;
one example per fsdp shard, so a global batch of 8 (`per_device_batch_size` 1
x data*fsdp). Every host runs the same command; on Cloud TPU VMs
`jax.distributed.initialize()` finds the other hosts by itself:

  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command="cd psynth_jax && \\
    python experiments/train.py --config psynth_jax/configs/qwen3_14b.py \\
      --workdir gs://BUCKET/psynth/qwen3_14b_stage1 \\
      --config.data.train_jsonl=gs://BUCKET/traces/stage1.jsonl"

The workdir and the traces must be on storage every host sees (GCS).

Memory per chip (`python experiments/memory_qwen3_14b.py`, which traces the step at
these shapes and counts what its backward pass keeps; results/memory_qwen3_14b.json):
the frozen bf16 weights are 29.5 GB, 0.92 GB per chip over fsdp x tensor; one
example's caches (8 branches x 2048 rows and the merged 9216 rows, 40 layers, 8 kv
heads x 128, bf16) 4.2 GB, 1.05 GB per chip over the kv heads; the trainables with
their gradient and Adam moments 0.34 GB. What the backward keeps besides, by
`train.remat` (psynth_jax.model.remat), per example and per chip:

  none           178 GB   46 GB  every layer's float32 attention scores [40, 1024, 9216]
  dots            67 GB   18 GB  the matmul outputs, attention scores included
  dots_no_batch  5.7 GB  2.9 GB  the projections (q/k/v/o, MLP, LoRA); attention recomputed
  full           1.0 GB 0.65 GB  each layer's input; the whole layer recomputed

plus, with any remat, one layer's recomputed attention at a time (scores,
probabilities and their cotangent: 4.5 GB, 1.1 GB per chip). So "none" needs about
49 GB per chip before XLA's own temporaries and fits only v5p's 95 GB; the default
"dots_no_batch" needs about 6.3 GB (about one extra attention forward per step), and
"full" about 4.1 GB, which leaves room for 4x longer budgets or a v5e's 16 GB.
"""

from ml_collections import ConfigDict

from psynth_jax.configs.base import default_config
from psynth_jax.model.config import ModelConfig


def model_config(dtype: str = "bfloat16") -> ModelConfig:
  """Qwen/Qwen3-14B's shapes (its config.json), for memory budgets and random-weight runs."""
  return ModelConfig(
    "qwen3",
    vocab_size=151936,
    hidden_size=5120,
    intermediate_size=17408,
    num_layers=40,
    num_heads=40,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    qk_norm=True,
    max_position_embeddings=40960,
    dtype=dtype,
  )


def get_config(arg: str = "") -> ConfigDict:
  del arg
  c = default_config()
  c.model.path = "~/.cache/psynth_jax/models/qwen3-14b"  # converted with `psynth convert`
  c.model.dtype = "bfloat16"
  c.data.source = "jsonl"
  c.batch.update(
    per_device_batch_size=1,
    max_branches=8,
    branch_tokens=2048,  # one worker output
    branch_rows=8192,  # all branches of one example together
    synth_tokens=1024,  # synthesizer prompt + target
    target_tokens=768,
    teacher_tokens=8192 + 1024,  # used only with kl_weight > 0
  )
  c.train.num_steps = 0  # one epoch
  c.train.num_epochs = 1
  c.train.remat = "dots_no_batch"  # see the memory table above
  c.optimizer.learning_rate = 1e-4
  c.mesh.shape = (1, -1, 4)
  c.checkpoint.update(every=200, max_to_keep=3, async_save=True)
  c.log_every = 10
  c.distributed.auto = True
  return c
