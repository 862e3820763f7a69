"""The distillation train step: one jitted program per step.

  branch tokens [B, K, S] --frozen base prefill, stop_gradient--> branch caches
  --re-encode + mapper + merge (`synthesis.latent_hidden`)--> synthesizer with
  LoRA over prompt + target [B, T] --> logits at the N target positions
  --> CE on target tokens (+ kl_weight * KL to the text-concatenation teacher,
  whose logits the frozen base computes in the same program).

With `path="text"` the step trains the control arm instead: a LoRA on the text
synthesizer (the branches pasted as text: the teacher's prompt), the same CE on the
same targets, no branch caches, no mapper. It tells how much of an arm's gain over the
untrained text synthesizer is learning the targets' format rather than reading caches.

Trainable parameters are `{"mapper": Mapper, "lora": LoRAWeights}`; the
frozen base `Params` is a separate argument that is never differentiated and
never returned. `trainable` picks what learns (`both | mapper_only |
lora_only`): the other part is wrapped in `stop_gradient` and its optimizer
branch is `optax.set_to_zero`, so it neither receives gradient nor Adam
state. A batch without any target token (every example skipped) leaves the
parameters and optimizer state untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from psynth_jax import operators, pytree, sharding
from psynth_jax.kv_cache import KVCache, take_rows
from psynth_jax.mapper import Mapper, check_mapper
from psynth_jax.model.lora import LoRAWeights, check_lora
from psynth_jax.model.remat import check_policy
from psynth_jax.model.transformer import Params, hidden_states, unembed
from psynth_jax.synthesis import latent_hidden
from psynth_jax.train import losses
from psynth_jax.train.batching import Batch
from psynth_jax.workers import Branches

TRAINABLE = ("both", "mapper_only", "lora_only")
PATHS = ("cache", "text")  # the synthesizer trained: over merged branch caches, or over text
SCHEDULES = ("constant", "warmup_constant", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW; the defaults are the paper's (lr 1e-4, no weight decay, no schedule)."""

  learning_rate: float = 1e-4
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  schedule: str = "constant"
  warmup_steps: int = 0
  decay_steps: int = 0  # optimizer updates of the cosine decay (after warmup)
  end_lr_fraction: float = 0.0
  grad_clip_norm: float = 0.0  # 0 turns clipping off
  grad_accum_steps: int = 1  # micro-batches per update (optax.MultiSteps)
  # Weight decay on matrices (ndim >= 2) only, never on norm scales or biases:
  # what full-parameter pretraining wants; adapters decay everything.
  decay_matrices_only: bool = False

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.schedule == "warmup_cosine" and self.decay_steps < 1:
      raise ValueError("warmup_cosine needs decay_steps >= 1")
    if self.grad_accum_steps < 1:
      raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What one step computes (static under jit)."""

  branch_rows: int  # rows of the merged branch cache (BatchSpec.branch_rows)
  trainable: str = "both"
  ce_weight: float = 1.0
  kl_weight: float = 0.0
  kl_temperature: float = 1.0
  loss_normalize: str = "example"  # losses.NORMALIZE: per example (the reference) or per token
  seed: int = 0  # LoRA dropout keys are fold_in(key(seed), step): resuming replays them
  worker_prompt_tokens: int = 0  # BatchSpec.worker_prompt_tokens
  remat: str = "none"  # the synthesizer's per-layer policy (psynth_jax.model.remat)
  # A merge operator spec the mapper trains inside (psynth_jax.operators.from_spec, e.g.
  # "recompute:fraction=0.15"); "": the paper's re-encode + mapper.
  merge: str = ""
  path: str = "cache"  # PATHS; "text": the text-synthesizer LoRA (module docstring)

  def __post_init__(self):
    check_policy(self.remat)
    if self.trainable not in TRAINABLE:
      raise ValueError(f"trainable must be one of {TRAINABLE}, got {self.trainable!r}")
    if self.path not in PATHS:
      raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
    if self.path == "text":
      # The text synthesizer has no mapper, no merge and is its own teacher.
      if self.trainable != "lora_only":
        raise ValueError(f"path='text' trains the LoRA only; got trainable={self.trainable!r}")
      if self.merge or self.kl_weight > 0:
        raise ValueError("path='text' takes no merge operator and no KL (it is the teacher)")
    if self.merge:
      name = operators.parse_spec(self.merge)[0]
      if name not in operators.names():
        raise ValueError(f"unknown merge operator {name!r}; expected one of {operators.names()}")
    if self.loss_normalize not in losses.NORMALIZE:
      raise ValueError(
        f"loss_normalize must be one of {losses.NORMALIZE}, got {self.loss_normalize!r}"
      )

  def trains(self, part: str) -> bool:
    return trains(self.trainable, part)


def trains(trainable: str, part: str) -> bool:
  """Whether `part` ("mapper", "lora" or "operator": an operator's own arrays, trained
  with the mapper) learns in mode `trainable`."""
  part = "mapper" if part == "operator" else part
  return trainable == "both" or trainable == f"{part}_only"


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation
  schedule: optax.Schedule  # update count -> learning rate
  accum_steps: int


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  lr = cfg.learning_rate
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  warmup = optax.linear_schedule(0.0, lr, max(cfg.warmup_steps, 1))
  if cfg.schedule == "warmup_constant":
    after = optax.constant_schedule(lr)
  else:
    after = optax.cosine_decay_schedule(lr, cfg.decay_steps, cfg.end_lr_fraction)
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _matrices(params):
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def _adamw(cfg: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Clipping (if on) then AdamW over one tree: the maths both trainers share."""
  mask = _matrices if cfg.decay_matrices_only else None
  adamw = optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  if cfg.grad_clip_norm > 0:
    adamw = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
  return adamw


def make_optimizer(cfg: OptimizerConfig, trainable: str | None) -> Optimizer:
  """AdamW (+ clipping) on the trainable part, zero updates elsewhere, optional accumulation.

  `trainable` None: one tree whose every leaf learns (full-parameter pretraining);
  otherwise a `TRAINABLE` mode over `{"mapper": ..., "lora": ...}`.
  """
  schedule = make_schedule(cfg)
  tx = _adamw(cfg, schedule)
  if trainable is not None:

    def labels(params):
      return {
        part: jax.tree.map(lambda _, p=part: "train" if trains(trainable, p) else "frozen", tree)
        for part, tree in params.items()
      }

    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  if cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
  return Optimizer(tx, schedule, cfg.grad_accum_steps)


@pytree.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data position (never the frozen base)."""

  step: jax.Array  # [] int32, micro-steps taken
  params: dict[str, Any]  # {"mapper": Mapper, "lora": LoRAWeights}
  opt_state: Any
  skipped: jax.Array  # [] int32, examples skipped by the token guards so far


def init_state(
  mapper: Mapper, lora: LoRAWeights, optimizer: Optimizer, operator=None
) -> TrainState:
  """`operator`: a merge operator's own trainable arrays (`Reencode.own_params`, e.g. link
  tokens), learned with the mapper; None for operators that have none."""
  params = {"mapper": mapper, "lora": lora}
  if operator is not None:
    params["operator"] = operator
  state = TrainState(
    jnp.zeros((), jnp.int32), params, optimizer.tx.init(params), jnp.zeros((), jnp.int32)
  )
  # Distinct buffers: the step donates the state, and a buffer cannot be donated twice.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def encode_branch_batch(
  base: Params,
  tokens: jax.Array,
  mask: jax.Array,
  start: jax.Array | None = None,
  prompt_tokens: int = 0,
) -> Branches:
  """Prefills [B, K, W + S] right-padded rows from position 0 -> Branches [B, K, S, ...].

  A row is worker i's prompt (`start` tokens, at most W = `prompt_tokens`; None:
  no prompts), then its branch. Only the branch's cache rows are kept, at RoPE
  offset `start`: the rows the worker produced while writing the branch, which
  the merge re-encodes to position 0 exactly as for `run_workers` outputs. With W = 0 this is
  `workers.encode_branches`, batched over examples (B * K independent sequences).
  No gradient: the workers are the frozen base.
  """
  b, k, r = tokens.shape
  s = r - prompt_tokens
  flat_tokens, flat_mask = tokens.reshape(b * k, r), mask.reshape(b * k, r)
  positions = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (b * k, r))
  cache = KVCache.empty(base.config, b * k, r)
  _, cache = hidden_states(base, flat_tokens, positions, cache, flat_mask)
  cache = jax.lax.stop_gradient(cache)
  start = (
    jnp.zeros((b * k,), jnp.int32) if start is None else start.reshape(b * k).astype(jnp.int32)
  )
  lengths = flat_mask.sum(-1).astype(jnp.int32) - start
  rows = jnp.minimum(start[:, None] + jnp.arange(s, dtype=jnp.int32), r - 1)  # [BK, S]
  valid = jnp.arange(s)[None] < lengths[:, None]

  def branch_rows(x):  # [B*K, G, rows, H] -> [B, K, G, S, H]: the branch's rows only
    g, h = x.shape[1], x.shape[3]
    return take_rows(x, rows).reshape(b, k, g, s, h)

  cache = KVCache(
    k=tuple(branch_rows(x) for x in cache.k),
    v=tuple(branch_rows(x) for x in cache.v),
    positions=jnp.where(valid, rows, 0).reshape(b, k, s),
    valid=valid.reshape(b, k, s),
    index=jnp.full((b,), s, jnp.int32),  # latent_hidden vmaps every leaf over B
  )
  branch_tokens = jnp.where(valid, jnp.take_along_axis(flat_tokens, rows, axis=1), 0)
  return Branches(
    cache,
    lengths.reshape(b, k),
    start.reshape(b, k),
    branch_tokens.reshape(b, k, s),
    base.fingerprint,
  )


def text_hidden(base: Params, batch: Batch, lora=None, lora_rng=None, remat: str = "none"):
  """Hidden states [B, Y, D] at the target positions of the text-concatenation synthesizer:
  the base (with `lora` in its layers, if given) over the branches pasted as text, the
  batch's teacher prompt."""
  if batch.teacher_tokens is None:
    raise ValueError("the text synthesizer needs teacher tokens (BatchSpec.teacher_tokens > 0)")
  p = batch.teacher_tokens.shape[1]
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), batch.teacher_tokens.shape)
  x, _ = hidden_states(
    base, batch.teacher_tokens, positions, None, batch.teacher_mask, lora, lora_rng, remat
  )
  return losses.gather_positions(x, batch.teacher_pos)


def teacher_logits(base: Params, batch: Batch, lora=None) -> jax.Array:
  """The text-concatenation teacher's logits at the target positions [B, Y, V] (no gradient).

  The teacher is the base model; `lora` only limits its vocabulary to the
  student's (`lora.config.vocab_size`), so that the KL compares distributions
  over the same ids.
  """
  x = jax.lax.stop_gradient(text_hidden(base, batch))
  return jax.lax.stop_gradient(unembed(base, x, lora))


def merge_operator(params, merge: str, model_config):
  """The operator the synthesizer trains under: its own arrays (`params["operator"]`) around
  the mapper, or the operator `merge` names around it ("" : the mapper, the paper's)."""
  if "operator" in params:
    return params["operator"].replace(mapper=params["mapper"])
  return operators.wrapping(merge, model_config, params["mapper"])


def cache_hidden(params, base: Params, batch: Batch, config: StepConfig, lora_rng=None):
  """The Parallel-Synthesis synthesizer's hidden states [B, T, D] over the merged branch
  caches (the branches prefilled by the frozen base in the same program)."""
  branches = encode_branch_batch(
    base, batch.branch_tokens, batch.branch_mask, batch.branch_start, config.worker_prompt_tokens
  )
  return latent_hidden(
    base,
    branches,
    batch.tokens,
    batch.mask,
    merge_operator(params, config.merge, base.config),
    params["lora"],
    config.branch_rows,
    batch.num_workers,
    lora_rng,
    config.remat,
  )


def loss_fn(params, base: Params, batch: Batch, rng: jax.Array, config: StepConfig):
  """(loss, metrics) of one batch; differentiable in `params` only."""
  params = {
    part: tree if config.trains(part) else jax.lax.stop_gradient(tree)
    for part, tree in params.items()
  }
  lora = params["lora"]
  lora_rng = rng if lora.config.dropout > 0 else None
  if config.path == "text":
    x = text_hidden(base, batch, lora, lora_rng, config.remat)
  else:
    x = cache_hidden(params, base, batch, config, lora_rng)
    x = losses.gather_positions(x, batch.score_pos)
  logits = unembed(base, x, lora)  # [B, Y, V]
  ce = losses.cross_entropy(logits, batch.labels, batch.weights, config.loss_normalize)
  metrics = {"ce": ce, "accuracy": losses.accuracy(logits, batch.labels, batch.weights)}
  loss = config.ce_weight * ce
  if config.kl_weight > 0:
    if batch.teacher_tokens is None:
      raise ValueError("kl_weight > 0 needs teacher tokens (BatchSpec.teacher_tokens > 0)")
    kl = losses.kl_to_teacher(
      logits,
      teacher_logits(base, batch, lora),
      batch.weights,
      config.kl_temperature,
      config.loss_normalize,
    )
    metrics["kl"] = kl
    loss = loss + config.kl_weight * kl
  return loss, metrics


def _select(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def _processed_tokens(batch: Batch, config: StepConfig) -> jax.Array:
  """Tokens run through a model this step: branch prefill + synthesizer (+ teacher), or the
  text synthesizer's alone."""
  if config.path == "text":
    return jnp.sum(batch.teacher_mask)
  total = jnp.sum(batch.branch_mask) + jnp.sum(batch.mask)
  if config.kl_weight > 0:
    total = total + jnp.sum(batch.teacher_mask)
  return total


def train_step(
  state: TrainState,
  base: Params,
  batch: Batch,
  config: StepConfig,
  optimizer_config: OptimizerConfig,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer (micro-)step; returns the new state and scalar metrics.

  The optimizer is built from its (static) config while tracing: optax
  transforms are pure functions, and a config compares by value, so equal
  configs reuse one compiled step.
  """
  optimizer = make_optimizer(optimizer_config, config.trainable)
  # Shapes are known while tracing: a foreign mapper or LoRA fails here, by name.
  check_mapper(state.params["mapper"], base.config.num_layers)
  check_lora(state.params["lora"], base.config)
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, metrics), grads = grad_fn(state.params, base, batch, rng, config)
  updates, opt_state = optimizer.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Every example of the batch was skipped: no information, so no update at all.
  has_tokens = jnp.sum(batch.weights) > 0
  params = _select(has_tokens, params, state.params)
  opt_state = _select(has_tokens, opt_state, state.opt_state)
  skipped = jnp.sum(batch.skipped).astype(jnp.int32)
  metrics.update(
    loss=loss,
    grad_norm=optax.global_norm(grads),
    learning_rate=optimizer.schedule(state.step // optimizer.accum_steps),
    skipped=skipped,
    examples=batch.skipped.shape[0] - skipped,
    target_tokens=jnp.sum(batch.weights),
    tokens=_processed_tokens(batch, config),
  )
  new_state = TrainState(state.step + 1, params, opt_state, state.skipped + skipped)
  return new_state, metrics


def make_train_step(
  config: StepConfig,
  optimizer_config: OptimizerConfig,
  mesh=None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  state: TrainState | None = None,
  base: Params | None = None,
  batch: Batch | None = None,
  compiler_options: dict[str, Any] | None = None,
):
  """`train_step` jitted; with a mesh, with explicit in/out shardings.

  jax's own cache keys the program on the static configs and shardings: a
  second call with equal arguments (a second `train()` in the process) compiles
  nothing new. The state (small: mapper, LoRA, Adam moments) is replicated, the frozen base
  is sharded by the logical-axis rules, and the batch is split over the batch
  mesh axes. `state`, `base` and `batch` (arrays or abstract shapes) give the
  pytree structures the shardings are built for. The state is donated.
  `compiler_options` go to XLA (e.g. {"xla_backend_optimization_level": 0}
  compiles tiny CPU test models several times faster).
  """
  # The configs are static (positional: jit takes no keyword arguments with in_shardings).
  jit = functools.partial(
    jax.jit, static_argnums=(3, 4), donate_argnums=0, compiler_options=compiler_options
  )
  if mesh is None:
    step = jit(train_step)
  else:
    state_sh = sharding.tree_shardings(state, mesh, rules)
    base_sh = sharding.tree_shardings(base, mesh, rules)
    batch_sh = jax.tree.map(lambda x: sharding.batch_sharding(mesh, rules, x.ndim), batch)
    step = jit(
      train_step,
      in_shardings=(state_sh, base_sh, batch_sh),
      out_shardings=(state_sh, sharding.replicated(mesh)),
    )
  return lambda state, base, batch: step(state, base, batch, config, optimizer_config)
