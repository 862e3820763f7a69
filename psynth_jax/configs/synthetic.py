r"""The synthetic suite's trainer config (and the reproduction's pretraining settings).

  python experiments/train.py --config psynth_jax/configs/synthetic.py:tiny --workdir /tmp/psynth/tiny
  python experiments/reproduce_synthetic.py --config psynth_jax/configs/synthetic.py

In the package, so that notebooks import the same config (`get_config("random,fast")`).
Every field can be overridden on the command line (`--config.train.num_steps=50`).
The traces are the suite's own problems with gold targets (`data.source="task"`); to
distil the base model's text syntheses instead, write them with
`experiments/make_traces.py` and pass `--config.data.source=jsonl
--config.data.train_jsonl=PATH`.

Arguments, comma-separated:
  tiny     the shipped word-level base model (psynth_jax/assets/synthetic_base)
  random   a random 2-layer model over the suite vocabulary instead (tests, smoke runs; no files needed)
  kl       add the token-level KL to the text-concatenation teacher (weight 0.5)
  fast     cheap XLA compilation (CPU), for tests
"""

from ml_collections import ConfigDict

from psynth_jax.configs.base import default_config
from psynth_jax.eval.shipped import SYNTHETIC_BASE
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer


def random_model() -> ConfigDict:
  """A tiny random Llama over the synthetic suite's word-level vocabulary."""
  return ConfigDict(
    dict(
      model_type="llama",
      vocab_size=SuiteTokenizer().vocab_size,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      max_position_embeddings=1024,
      dtype="float32",
    )
  )


def get_config(arg: str = "tiny") -> ConfigDict:
  options = set(arg.split(",")) if arg else {"tiny"}
  unknown = options - {"tiny", "random", "kl", "fast"}
  if unknown:
    raise ValueError(f"unknown synthetic config options {sorted(unknown)}")
  c = default_config()
  c.model.path = "" if "random" in options else SYNTHETIC_BASE
  c.model.tokenizer = "suite"
  c.model.init = random_model()
  # In 12k examples of all splits the longest has 8 branches, a 25-token branch,
  # 200 branch tokens in all, a 47-token worker prompt, 23 + 18 synthesizer prompt
  # + target tokens and a 265-token text-synthesis prompt + target: nothing is skipped.
  # Branches are encoded after their worker prompts, as the workers wrote them.
  c.batch.update(
    batch_size=8,
    max_branches=8,
    branch_tokens=32,
    branch_rows=224,
    synth_tokens=48,
    target_tokens=24,
    teacher_tokens=272,
    worker_prompt_tokens=48,
  )
  c.data.num_examples = 16000  # one epoch = 2000 steps of 8
  c.train.loss_normalize = "token"  # how the shipped adapters were trained
  # A tiny model needs a larger step than the paper's 1e-4 to learn in one epoch.
  c.optimizer.learning_rate = 1e-3
  c.checkpoint.every = 50
  if "kl" in options:
    c.train.kl_weight = 0.5
  c.fast_compile = "fast" in options
  # Base-model pretraining (`psynth_jax.tasks.synthetic_pretrain.PretrainConfig`
  # documents each field), read by experiments/pretrain_synthetic.py and
  # experiments/reproduce_synthetic.py only (the trainer ignores it).
  c.pretrain = ConfigDict(
    dict(
      # The shipped base model: 4 layers of width 128, 4 heads.
      hidden_size=128,
      num_layers=4,
      num_heads=4,
      intermediate_size=384,
      max_positions=1024,
      steps=4000,
      batch_tokens=2048,
      buckets=(48, 64, 96, 128, 176, 272, 368),
      # AdamW, warmup then cosine decay to 5% of the peak at `steps`.
      learning_rate=3e-3,
      warmup_steps=100,
      final_lr_fraction=0.05,
      weight_decay=0.05,
      grad_clip=1.0,
      b1=0.9,
      b2=0.98,
      prompt_weight=0.0,  # completions only
      worker_rate=1.0,
      text_rate=1.0,
      single_rate=0.1,
      follow_ups=3,
      copy_steps=300,
      short_steps=1000,
      short_max_workers=3,
      train_examples=30000,
      min_workers=2,
      max_workers=synthetic.MAX_WORKERS,
      seed=0,
      init_from="",  # random init
      eval_every=500,
      eval_examples=60,
      max_new_tokens=64,
    )
  )
  # Later phases, each continuing from the one before (fresh optimizer and
  # schedule, full mix, no curriculum); keys phase2, phase3, ...; {} = one phase only.
  c.pretrain_more = ConfigDict(
    dict(
      phase2=dict(steps=8000, copy_steps=0, short_steps=0, learning_rate=2e-3, follow_ups=6),
      # Fresh examples (seed 3, twice as many) at half the peak step.
      phase3=dict(
        steps=7000,
        copy_steps=0,
        short_steps=0,
        learning_rate=1e-3,
        follow_ups=6,
        train_examples=60000,
        seed=3,
        eval_every=1000,
      ),
    )
  )
  c.reproduce = ConfigDict(
    dict(
      # adapter name -> (trainable, mapper kind); names as in psynth_jax.eval.shipped.
      adapters=dict(
        mapper_only=("mapper_only", "affine"),
        lora_only=("lora_only", "affine"),  # the mapper stays at its identity init
        parallel_synthesis_affine=("both", "affine"),
        parallel_synthesis_head_affine=("both", "head_affine"),
      ),
      adapter_steps=2000,  # one epoch of data.num_examples
      eval_examples=300,  # test split, seed 0: the accuracy table
      check_examples=60,  # the fixed subset whose accuracy the shipped-model tests re-check
      ttft_examples=8,
      lengths=(16, 32, 64, 128),
    )
  )
  return c
