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

The workdir and the traces must be on storage every host sees (GCS). Memory:
the frozen weights take 28 GB (0.9 GB per chip sharded), the branch caches of
one example 8 x 2048 rows x 40 layers x 2 x 8 x 128 x 2 B = 1.3 GB; the peak is
the synthesizer's backward pass, whose saved float32 attention scores over
1024 queries x 9216 rows are 1.5 GB per layer, 60 GB over 40 layers, 15 GB per
chip on the 4-way tensor axis (v5p: 95 GB HBM per chip). Longer budgets need
per-layer rematerialisation in the model.
"""

from ml_collections import ConfigDict

from psynth_jax.configs.base import default_config


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
  c.optimizer.learning_rate = 1e-4
  c.mesh.shape = (1, -1, 4)
  c.checkpoint.update(every=200, max_to_keep=3, async_save=True)
  c.log_every = 10
  c.distributed.auto = True
  return c
