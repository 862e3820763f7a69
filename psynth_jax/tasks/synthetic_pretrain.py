"""Full-parameter pretraining of a tiny base model on the synthetic suite.

The base model must do two jobs before any mapper or LoRA exists: act as every
worker (worker prompt -> branch text) and synthesize from concatenated worker
outputs (text-synthesis prompt -> answer). It is trained from scratch, with
next-token cross-entropy on completion tokens only, on a mix of three formats
from `psynth_jax.tasks.synthetic`:

* text synthesis: `text_synthesis_prompt_text` -> `target_text`, then up to
  `follow_ups` more questions on the same branches ("\nq: ...\na:" -> target);
* worker: `worker_prompt_text(i)` -> `worker_target_text(i)` (one branch per example);
* single agent: `single_agent_prompt_text` -> `target_text`.

Sequences carry no <bos>; `<eos>` ends every completion. They are
right-padded into a few length buckets, with the rows per batch chosen so that
every batch holds about `batch_tokens` tokens, so a handful of shapes compile
once. The optimiser is the distillation trainer's (`psynth_jax.train.step`):
AdamW with linear warmup then cosine decay, over every parameter.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psynth_jax.language_model import LanguageModel
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.transformer import Params, forward, init_params, with_fingerprint
from psynth_jax.tasks import base, synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.train import step as step_lib
from psynth_jax.train.step import OptimizerConfig

FORMATS = ("text", "worker", "single")
# The validation and test examples every run is scored on, whatever its `seed`:
# phases and runs with different seeds stay comparable.
EVAL_SEED = 0


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Model size, data mix and optimiser settings: a schema without defaults.

  The values (the shipped base model's) live in `psynth_jax/configs/synthetic.py`
  (`config.pretrain`); build one with `from_dict`, which names any key missing or left over.
  """

  hidden_size: int  # D
  num_layers: int  # L
  num_heads: int  # N (= G: no grouping at this size)
  intermediate_size: int  # F
  max_positions: int
  steps: int
  batch_tokens: int  # tokens per batch, padding included
  buckets: tuple[int, ...]  # padded sequence lengths
  # AdamW: linear warmup to `learning_rate`, cosine decay to `final_lr_fraction` of it
  # at `steps`; weight decay on matrices only; clipping to global norm `grad_clip` (0: off).
  learning_rate: float
  warmup_steps: int
  final_lr_fraction: float
  weight_decay: float
  grad_clip: float
  b1: float
  b2: float
  # Weight of prompt tokens in the loss (completion tokens weigh 1). 0 trains on
  # completions only; a small weight teaches the model the formats' text too.
  prompt_weight: float
  # Sequences drawn per training example, on average: `text_rate` text-synthesis,
  # `worker_rate` worker (each a random branch) and `single_rate` single-agent ones.
  worker_rate: float
  text_rate: float
  single_rate: float
  # More questions on the same branches after a text-synthesis answer (dense
  # supervision: the branches cost most of a sequence, each answer adds a few tokens).
  follow_ups: int
  # Curriculum: the first `copy_steps` steps see worker sequences only. They are
  # short and mostly completion, so the copy (induction) circuits that every
  # format needs form several times faster than on the full mix. The next
  # `short_steps` see the full mix with at most `short_max_workers` branches:
  # short contexts, so many more answers per step while lookups are learnt.
  copy_steps: int
  short_steps: int
  short_max_workers: int
  train_examples: int
  min_workers: int
  max_workers: int
  seed: int  # init, data order and the train examples (a new seed: new examples)
  # A base-model folder to continue from (its sizes must match); "" = random init.
  # The optimizer and schedule start afresh: a second phase of pretraining.
  init_from: str
  eval_every: int  # 0: evaluate only at the end
  eval_examples: int
  max_new_tokens: int

  @classmethod
  def from_dict(cls, values: Mapping) -> PretrainConfig:
    """From plain values (`config.pretrain.to_dict()`, plus overrides): lists become
    tuples; a missing or unknown key is an error naming it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    if unknown := set(values) - fields:
      raise ValueError(f"unknown PretrainConfig fields {sorted(unknown)}")
    if missing := fields - set(values):
      raise ValueError(f"missing PretrainConfig fields {sorted(missing)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

  def optimizer_config(self) -> OptimizerConfig:
    """The trainer's optimizer settings for this run: the cosine ends at `steps`."""
    return OptimizerConfig(
      learning_rate=self.learning_rate,
      weight_decay=self.weight_decay,
      b1=self.b1,
      b2=self.b2,
      schedule="warmup_cosine",
      warmup_steps=self.warmup_steps,
      decay_steps=max(self.steps - self.warmup_steps, 1),
      end_lr_fraction=self.final_lr_fraction,
      grad_clip_norm=self.grad_clip,
      decay_matrices_only=True,
    )

  def model_config(self) -> ModelConfig:
    return ModelConfig(
      model_type="llama",
      vocab_size=SuiteTokenizer().vocab_size,
      hidden_size=self.hidden_size,
      intermediate_size=self.intermediate_size,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      num_kv_heads=self.num_heads,
      head_dim=self.hidden_size // self.num_heads,
      rms_norm_eps=1e-5,
      tie_word_embeddings=True,
      max_position_embeddings=self.max_positions,
    )


# ---------------------------------------------------------------- data


def format_pair(example: synthetic.Example, fmt: str, branch: int = 0) -> tuple[str, str]:
  """(prompt, completion) text of one example in one format."""
  if fmt == "text":
    return synthetic.text_synthesis_prompt_text(example), synthetic.target_text(example)
  if fmt == "worker":
    prompt = synthetic.worker_prompt_text(example, branch)
    return prompt, synthetic.worker_target_text(example, branch)
  if fmt == "single":
    return synthetic.single_agent_prompt_text(example), synthetic.target_text(example)
  raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def follow_ups(
  example: synthetic.Example, n: int, rng: np.random.Generator
) -> list[tuple[str, str]]:
  """Up to n more (prompt, completion) turns on the same branches, asked after the answer."""
  questions = synthetic.follow_up_questions(example)
  pick = rng.permutation(len(questions))[:n]
  turns = []
  for i in pick:
    question, working, answer = questions[i]
    follow = dataclasses.replace(example, question=question, working=working, answer=answer)
    turns.append((f"\nq: {question}\na:", synthetic.target_text(follow)))
  return turns


def training_sequences(
  examples: Sequence[synthetic.Example],
  tokenizer: SuiteTokenizer,
  config: PretrainConfig,
  rng: np.random.Generator,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """(tokens, completion mask) sequences following the format mix of `config`.

  A sequence is one or more (prompt, completion) turns: text-synthesis
  sequences continue with up to `config.follow_ups` other questions on the same
  branches, every other format has one turn.
  """
  seqs = []
  for ex in examples:
    turns = []
    if rng.random() < config.text_rate:
      turns.append([format_pair(ex, "text"), *follow_ups(ex, config.follow_ups, rng)])
    for _ in range(rng.poisson(config.worker_rate)):
      turns.append([format_pair(ex, "worker", int(rng.integers(len(ex.branches))))])
    if rng.random() < config.single_rate:
      turns.append([format_pair(ex, "single")])
    for seq in turns:
      ids, mask = [], []
      for prompt, completion in seq:
        p, c = tokenizer.encode(prompt), tokenizer.encode(completion)
        ids += p + c
        mask += [False] * len(p) + [True] * len(c)
      seqs.append((np.asarray(ids, np.int32), np.asarray(mask, bool)))
  return seqs


def batches(
  seqs: Sequence[tuple[np.ndarray, np.ndarray]],
  buckets: Sequence[int],
  batch_tokens: int,
  rng: np.random.Generator,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless length-bucketed batches (reshuffled every pass).

  Yields:
    tokens [B, T] int32 right-padded with 0, and loss_mask [B, T] bool, True on
    completion tokens; T is a bucket and B = batch_tokens // T (short batches
    are filled with all-padding rows, which carry no loss).
  """
  too_long = max(len(s) for s, _ in seqs)
  if too_long > max(buckets):
    raise ValueError(f"a sequence has {too_long} tokens, longer than the largest bucket")
  by_bucket = collections.defaultdict(list)
  for i, (s, _) in enumerate(seqs):
    by_bucket[next(b for b in sorted(buckets) if b >= len(s))].append(i)
  while True:
    plan = []
    for length, idx in by_bucket.items():
      rows = max(1, batch_tokens // length)
      order = rng.permutation(idx)
      plan += [(length, order[i : i + rows], rows) for i in range(0, len(order), rows)]
    for j in rng.permutation(len(plan)):
      length, idx, rows = plan[j]
      tokens = np.zeros((rows, length), np.int32)
      loss_mask = np.zeros((rows, length), bool)
      for r, i in enumerate(idx):
        s, mask = seqs[i]
        tokens[r, : len(s)] = s
        loss_mask[r, : len(s)] = mask
      yield tokens, loss_mask


# ---------------------------------------------------------------- loss and step


def completion_loss(
  params: Params, tokens: jax.Array, loss_mask: jax.Array, prompt_weight: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy on completion tokens (and optionally down-weighted prompt tokens).

  Position t predicts token t+1, which has weight 1 if `loss_mask[:, t+1]`
  (completion), `prompt_weight` if it is another real token (prompt) and 0 for
  padding.

  Returns:
    (the weighted mean cross-entropy, the mean over completion tokens alone).
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  b, t = inputs.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  # Only padding uses id 0. Right padding is causally invisible to real tokens anyway;
  # the mask keeps all-padding rows finite.
  valid = inputs != 0
  logits, _ = forward(params, inputs, positions, None, valid)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  completion = loss_mask[:, 1:].astype(jnp.float32)
  weights = completion + prompt_weight * ((targets != 0) & ~loss_mask[:, 1:])
  completion_nll = (nll * completion).sum() / jnp.maximum(completion.sum(), 1)
  return (nll * weights).sum() / jnp.maximum(weights.sum(), 1), completion_nll


@functools.partial(
  jax.jit,
  static_argnames=("optimizer_config", "prompt_weight"),
  donate_argnames=("params", "opt_state"),
)
def train_step(
  params: Params,
  opt_state,
  tokens: jax.Array,
  loss_mask: jax.Array,
  optimizer_config: OptimizerConfig,
  prompt_weight: float = 0.0,
):
  """One optimizer step on all parameters; returns (params, opt_state, completion loss).

  The optimizer is the distillation trainer's (`step.make_optimizer` over the
  whole tree), built from its static config while tracing, as `step.train_step` does.
  """
  optimizer = step_lib.make_optimizer(optimizer_config, trainable=None)
  grad_fn = jax.value_and_grad(completion_loss, has_aux=True)
  (_, completion_nll), grads = grad_fn(params, tokens, loss_mask, prompt_weight)
  updates, opt_state = optimizer.tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, completion_nll


# ---------------------------------------------------------------- evaluation


def generate_batched(
  lm: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 64
) -> list[list[int]]:
  """Greedy generation in length-sorted batches (so little padding), in input order."""
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  out: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    # Pad the batch to a fixed size with copies so that one shape serves all batches.
    batch = [prompts[i] for i in idx] + [prompts[idx[0]]] * (batch_size - len(idx))
    for i, tokens in zip(idx, lm.generate(batch, max_new_tokens), strict=False):
      out[i] = tokens
  return out


def evaluate(
  lm: LanguageModel,
  examples: Sequence[synthetic.Example],
  max_new_tokens: int = 64,
  batch_size: int = 64,
) -> dict[str, dict[str, float]]:
  """Text synthesis over gold branches (per family) and worker exact match."""
  tok = lm.tokenizer
  prompts = [tok.encode(synthetic.text_synthesis_prompt_text(ex)) for ex in examples]
  preds = [tok.decode(t) for t in generate_batched(lm, prompts, max_new_tokens, batch_size)]
  # Workers are copy-like and many: a third of the examples is enough to track them.
  worker_pairs = [
    (ex, i) for ex in examples[: len(examples) // 3 + 1] for i in range(len(ex.branches))
  ]
  prompts = [tok.encode(synthetic.worker_prompt_text(ex, i)) for ex, i in worker_pairs]
  outs = generate_batched(lm, prompts, max_new_tokens, batch_size)
  worker_ok = [
    synthetic.branch_from_output(tok.decode(o)) == ex.branches[i]
    for (ex, i), o in zip(worker_pairs, outs, strict=True)
  ]
  scored = (
    (ex.family, synthetic.answer_matches(p, ex.answer))
    for ex, p in zip(examples, preds, strict=True)
  )
  return {
    "text": base.accuracy(scored, synthetic.FAMILIES),
    "worker": {"exact": float(np.mean(worker_ok))},
  }


# ---------------------------------------------------------------- driver


def language_model(params: Params) -> LanguageModel:
  """Wraps params with the suite tokenizer (stop on <eos>, pad with <pad>)."""
  tok = SuiteTokenizer()
  return LanguageModel(params, tok, tok.eos_token_ids, tok.pad_token_id)


def pretrain(
  config: PretrainConfig, progress: bool = True, log=print
) -> tuple[LanguageModel, list[dict]]:
  """Trains a base model from scratch; returns it and the eval history.

  Args:
    config: sizes, mix and optimiser settings.
    progress: show a tqdm bar with the running loss.
    log: where evaluation lines go.

  Returns:
    The trained `LanguageModel` and one dict per evaluation
    (step, seconds, text accuracy per family, worker exact match).
  """
  from tqdm.auto import tqdm

  t0, cpu0 = time.perf_counter(), time.process_time()
  tok = SuiteTokenizer()
  rng = np.random.default_rng(config.seed)
  train = synthetic.generate(
    "train", config.train_examples, config.seed, None, config.min_workers, config.max_workers
  )
  val = synthetic.generate("validation", config.eval_examples, EVAL_SEED)

  def stream(examples, mix):
    return batches(
      training_sequences(examples, tok, mix, rng), config.buckets, config.batch_tokens, rng
    )

  # (last step, batch stream) per curriculum stage.
  copy_mix = dataclasses.replace(config, text_rate=0.0, worker_rate=2.0, single_rate=0.0)
  stages = [(config.copy_steps, stream(train, copy_mix) if config.copy_steps else None)]
  short = None
  if config.short_steps:
    n = max(1, config.train_examples // 3)
    k = min(config.short_max_workers, config.max_workers)
    short = stream(
      synthetic.generate("train", n, config.seed + 1, None, config.min_workers, k), config
    )
  stages.append((config.copy_steps + config.short_steps, short))
  stages.append((config.steps, stream(train, config)))
  params = init_params(config.model_config(), config.seed)
  if config.init_from:
    from psynth_jax.language_model import load_pretrained

    loaded = load_pretrained(config.init_from).params
    if loaded.config != params.config:
      raise ValueError(
        f"{config.init_from} is a different model ({loaded.config}) than this config's"
        f" ({params.config})"
      )
    params = loaded
  optimizer_config = config.optimizer_config()
  opt_state = step_lib.make_optimizer(optimizer_config, trainable=None).tx.init(params)

  history, ema = [], None
  bar = tqdm(range(1, config.steps + 1), disable=not progress, desc="pretrain", mininterval=2)
  for step in bar:
    tokens, loss_mask = next(next(it for last, it in stages if step <= last))
    params, opt_state, loss = train_step(
      params, opt_state, tokens, loss_mask, optimizer_config, config.prompt_weight
    )
    evaluating = step == config.steps or (config.eval_every and step % config.eval_every == 0)
    if step % 10 == 0 or evaluating:
      loss = float(loss)
      ema = loss if ema is None else 0.9 * ema + 0.1 * loss
      bar.set_postfix(loss=f"{ema:.3f}")
    if evaluating:
      scores = evaluate(language_model(params), val, config.max_new_tokens)
      seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
      history.append({"step": step, "seconds": seconds, "cpu_seconds": cpu, **scores})
      text = " ".join(f"{k}={v:.3f}" for k, v in scores["text"].items())
      log(f"step {step}: loss {ema:.3f} | val text synthesis {text}")
      log(f"  worker exact {scores['worker']['exact']:.3f} | {seconds:.0f}s wall, {cpu:.0f}s cpu")
  # New weights, new fingerprint (branches of the initial model must not pass for ours).
  return language_model(with_fingerprint(params)), history


def save_base(lm: LanguageModel, out: str, info: dict, dtype: str = "float32") -> None:
  """Writes a converted model folder (+ the suite tokenizer files) and pretrain_info.json."""
  from psynth_jax.model.checkpoint import save_converted
  from psynth_jax.model.transformer import flat_state, params_from_flat

  params = lm.params
  if dtype != params.config.dtype:
    params = params_from_flat(params.config.replace(dtype=dtype), flat_state(params))
  with tempfile.TemporaryDirectory() as tmp:
    SuiteTokenizer().save(tmp)
    save_converted(params, out, tokenizer_src=tmp)
  with open(os.path.join(out, "pretrain_info.json"), "w") as f:
    json.dump({**info, "date": time.strftime("%Y-%m-%d")}, f, indent=2)
    f.write("\n")


def pretrain_and_save(
  config: PretrainConfig, out: str, test_examples: int, dtype: str = "float32", log=print
) -> dict:
  """`pretrain`, then text synthesis and workers on `test_examples` test examples
  (gold branches), then `save_base` to out with everything in pretrain_info.json.

  Returns:
    The saved info: config, parameter count, wall and CPU seconds, validation
    history and test scores.
  """
  t0, cpu0 = time.perf_counter(), time.process_time()
  lm, history = pretrain(config, log=log)
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  log(f"pretrained {lm.params.num_params():,} parameters in {wall / 60:.1f} min wall")
  test = synthetic.generate("test", test_examples, EVAL_SEED)
  scores = evaluate(lm, test, config.max_new_tokens)
  text = ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in scores["text"].items())
  log(f"test text synthesis ({len(test)} examples, gold branches): {text}")
  log(f"test workers exact: {100 * scores['worker']['exact']:.1f}%")
  info = {
    "config": dataclasses.asdict(config),
    "num_params": lm.params.num_params(),
    "train_wall_s": wall,
    "train_cpu_s": cpu,
    "cpus": os.cpu_count(),
    "device": jax.devices()[0].device_kind,
    "history": history,
    "test": {"num_examples": len(test), "seed": EVAL_SEED, **scores},
  }
  save_base(lm, out, info, dtype)
  return info
