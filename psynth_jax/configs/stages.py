"""The paper's two training stages on real data (`../shared/DESIGN.md` §1.6), scaled to a CPU.

`apply(c, "stage1[,ARM...]", model)` sets a trainer config's data file and budgets; the
model configs (`qwen2_5_coder_0_5b.py`, `smollm2_135m.py`) take the same argument:

  python experiments/build_stage1.py --limit 200 --out runs/qwen05/stage1 \
    --budget psynth_jax/configs/qwen2_5_coder_0_5b.py:stage1
  python experiments/train.py --config psynth_jax/configs/qwen2_5_coder_0_5b.py:stage1 \
    --workdir runs/train/qwen05/stage1

Stages:
  stage1  traces of experiments/build_stage1.py (chat rounds, tool calls, in-context examples,
          retrieved chunks) in runs/<model>/stage1/: up to 8 branches of <= 512 tokens, 2048
          cache rows, a target of <= 256 tokens (a retrieval problem's 5 chunks are ~1,750
          tokens at the median). Longer problems are dropped at build time (`--budget`).
  stage2  traces of experiments/build_stage2.py in runs/<model>/stage2/: 3 workers' outputs
          of <= 512 tokens after their prompts, the text synthesizer's answer of <= 512 (the
          eval harness's CPU budgets).
Arms (comma-separated after the stage):
  mapper_only | lora_only  train one part (default: both, the paper's)
  kl                       add the token-level KL to the text teacher (weight 0.5)
  quarter                  the data ablation: runs/<model>/<stage>_quarter/ (built with a
                           quarter of the --limit)
  text                     the control: a LoRA on the text synthesizer (branches pasted as
                           text), same targets; tells format learning from cache reading
One epoch over the traces at batch 2, the paper's AdamW at 1e-4. Batches are bucketed
(`batch.bucketed`): an epoch of the SmolLM2 stage-1 traces meets 97 batch shapes, each a
step program compiled for about a minute on 2 cores, so the run plans 8 shapes that hold
them all (`batch.max_shapes`, psynth_jax/train/shape_plan.py), at 4.3 % more padding.
"""

from ml_collections import ConfigDict

STAGES = ("stage1", "stage2")
ARMS = ("mapper_only", "lora_only", "kl", "quarter", "text")


def apply(c: ConfigDict, arg: str, model: str) -> ConfigDict:
  stage, *arms = arg.split(",")
  if stage not in STAGES:
    raise ValueError(f"expected a stage of {STAGES} first, got {stage!r}")
  if unknown := [a for a in arms if a not in ARMS]:
    raise ValueError(f"unknown arms {unknown}; known: {ARMS}")
  folder = f"{stage}_quarter" if "quarter" in arms else stage
  c.data.source = "jsonl"
  c.data.train_jsonl = f"runs/{model}/{folder}/train.jsonl"
  if stage == "stage1":
    c.batch.update(
      max_branches=8,
      branch_tokens=512,
      branch_rows=2048,
      synth_tokens=576,
      target_tokens=256,
      teacher_tokens=2560,  # the text teacher (KL arm, held-out CE): chunks pasted + target
      worker_prompt_tokens=0,  # stage-1 chunks are context: no worker wrote them
    )
  else:
    c.batch.update(
      max_branches=3,
      branch_tokens=512,
      branch_rows=1536,
      synth_tokens=768,
      target_tokens=512,
      teacher_tokens=2560,
      worker_prompt_tokens=384,
    )
  c.batch.batch_size = 2
  c.batch.bucketed = True  # real traces are mostly far below the budgets
  c.batch.max_shapes = 8  # SmolLM2 stage 1: 97 shapes met -> 8, +4.3 % padding cost
  c.train.num_steps = 0
  c.train.num_epochs = 1
  c.optimizer.learning_rate = 1e-4
  c.checkpoint.every = 10
  c.log_every = 1
  for arm in arms:
    if arm in ("mapper_only", "lora_only"):
      c.train.trainable = arm
    elif arm == "kl":
      c.train.kl_weight = 0.5
    elif arm == "text":  # the control: a LoRA on the text synthesizer, same targets
      c.train.path = "text"
      c.train.trainable = "lora_only"
  return c
