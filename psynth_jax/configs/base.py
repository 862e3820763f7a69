"""Every field the trainer reads, with the paper's defaults where it has one.

Each experiment config (`psynth_jax/configs/*.py`) starts from `default_config()`
and changes what it needs; `experiments/train.py --config FILE[:arg]` locks the
result, so a misspelt override is an error.
"""

import dataclasses

from ml_collections import ConfigDict

from psynth_jax import sharding
from psynth_jax.train.step import OptimizerConfig


def default_config() -> ConfigDict:
  """Every field `train` reads, with the paper's defaults where it has one (configs/ start here)."""
  rules = {name: ",".join(sharding.as_tuple(axes)) for name, axes in sharding.DEFAULT_RULES}
  return ConfigDict(
    dict(
      seed=0,
      fast_compile=False,  # CPU: cheap XLA compilation (tests, tiny models)
      log_every=10,
      # path: converted model folder; "" = random init from `init` (a ModelConfig dict).
      # tokenizer: "" = the folder's, "suite" = the synthetic suite's SuiteTokenizer.
      model=dict(path="", dtype="", tokenizer="", init=ConfigDict(), init_seed=0),
      data=dict(
        # task: `task`'s train problems with their gold branches and targets
        # (`data.gold_trace`); jsonl: a trace file (`psynth_jax.train.data`), whose
        # records name their own tasks.
        source="task",
        task="synthetic",  # a registered task (psynth_jax.tasks.names())
        num_examples=2000,  # problems of `task` (source=task)
        task_seed=0,
        task_options=dict(min_workers=2, max_workers=8),  # extra Task.load arguments
        train_jsonl="",
        tfds_dir="",  # default WORKDIR/tfds
        append_eos=True,  # end every target with the tokenizer's eos id
      ),
      batch=dict(  # shapes and token-budget guards (batching.BatchSpec)
        batch_size=8,  # global, used when per_device_batch_size is 0
        per_device_batch_size=0,  # x (data * fsdp) mesh devices
        max_branches=8,
        branch_tokens=64,
        branch_rows=320,
        synth_tokens=160,
        target_tokens=48,
        teacher_tokens=512,  # used only when train.kl_weight > 0
        # > 0: branches are encoded after their worker's prompt (records with
        # worker_prompts), as the workers produced them; 0: each branch alone.
        worker_prompt_tokens=0,
        # True: each batch only as large as its longest example, rounded up to a
        # bucket (powers of two up to the budgets above, which stay the guards); one
        # step program per shape met. False: every batch at the budget shapes.
        bucketed=False,
        # > 0 (bucketed): at most this many shapes, planned before the run from its
        # batches (psynth_jax/train/shape_plan.py); 0: every bucket shape met.
        max_shapes=0,
      ),
      mapper=dict(kind="affine", features="both"),
      # targets: the paper's q/k/v/o; gate/up/down add the dense MLP (psynth_jax.model.lora).
      lora=dict(rank=16, alpha=32.0, dropout=0.0, targets=("q", "k", "v", "o")),
      train=dict(
        trainable="both",  # both | mapper_only | lora_only
        num_steps=0,  # 0: num_epochs passes over the data
        num_epochs=1,
        ce_weight=1.0,
        kl_weight=0.0,
        kl_temperature=1.0,
        # "example": each example's mean over its target tokens, then the mean over
        # examples (the reference release); "token": the mean over all target tokens.
        loss_normalize="example",
        # What each synthesizer layer keeps for the backward pass (psynth_jax.model.remat):
        # none | full | dots | dots_no_batch. Memory against recomputation; no value changes.
        remat="none",
        # A merge operator the mapper and LoRA train under (psynth_jax.operators spec, e.g.
        # "recompute:fraction=0.15"); recorded in the export, which then loads as it.
        merge="",
        # The synthesizer trained: "cache" (Parallel-Synthesis, over merged branch caches) or
        # "text" (a LoRA on the text synthesizer reading the branches pasted as text, the
        # control arm; trainable lora_only, batch.teacher_tokens its budget).
        path="cache",
      ),
      optimizer=dataclasses.asdict(OptimizerConfig()),
      # shape over (data, fsdp, tensor); rules: logical axis -> "data,fsdp" | "fsdp" | "".
      mesh=dict(shape=(1, -1, 1), rules=rules),
      checkpoint=dict(every=50, max_to_keep=3, async_save=False),
      export=dict(enabled=True),
      distributed=dict(coordinator_address="", num_processes=0, process_id=0, auto=False),
    )
  )
