"""The training loop behind `experiments/train.py`: config in, trained mapper + LoRA out.

`train(config, workdir)` reads an `ml_collections` config (`default_config`
lists every field; `psynth_jax/configs/*.py` start from it), and:

1. joins a multi-host run if the config says so (`sharding.maybe_initialize_distributed`);
2. loads the frozen base (a converted folder) or initialises a random one,
   sharded over the (data, fsdp, tensor) mesh;
3. prepares the trace dataset (tfds array_record under the workdir) and a
   per-host `BatchIterator`;
4. restores the newest readable checkpoint of the workdir (state + data
   position), or starts fresh;
5. runs the jitted step with a tqdm bar, writing metrics to
   `workdir/metrics.jsonl` and TensorBoard events to `workdir/tensorboard`
   (loss, CE, KL, skipped examples, tokens/s of real tokens, learning rate, ...;
   the rates of the first row, and with `batch.bucketed` of any row whose
   steps met a new batch shape, include compilation, counted apart as `compile_s`;
   `batch.max_shapes` bounds the shapes, `shape_plan`);
6. saves checkpoints every `checkpoint.every` steps and at the end, then
   exports the LoRA (a PEFT adapter) and the mapper (the reference's state
   dict names) to `workdir/export/` (`checkpoints.export`).

SIGTERM (a scheduler's stop, `kill PID`) ends a single-process run after the step in
flight, with its metrics row and a checkpoint at that step, and no export: rerunning
resumes there and loses no step. A multi-process run keeps the default (a kill loses
the steps since the last checkpoint): the hosts would have to agree on the step to stop.

The workdir must be shared storage in a multi-host run (checkpoints, data).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import tqdm
from ml_collections import ConfigDict
from tensorboardX import SummaryWriter

from psynth_jax import compile_cache, operators, sharding, tasks
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights, check_targets
from psynth_jax.model.transformer import init_params, with_fingerprint
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.train import batching, checkpoints, data, shape_plan
from psynth_jax.train import step as step_lib


@dataclasses.dataclass
class TrainResult:
  state: step_lib.TrainState
  step: int
  history: list[dict[str, Any]]  # the metrics rows this run logged
  skip_reasons: dict[str, int]  # this host's skipped examples by reason (whole run, resumed too)
  export_dir: str | None
  interrupted: bool = False  # stopped by SIGTERM (checkpointed at `step`, not exported)


# ---------------------------------------------------------------- config -> library types
def batch_spec(config: ConfigDict) -> batching.BatchSpec:
  b = config.batch
  uses_teacher = config.train.kl_weight > 0 or config.train.path == "text"
  teacher = b.teacher_tokens if uses_teacher else 0
  return batching.BatchSpec(
    b.max_branches,
    b.branch_tokens,
    b.branch_rows,
    b.synth_tokens,
    b.target_tokens,
    teacher,
    b.worker_prompt_tokens,
    b.bucketed,
  )


def step_config(config: ConfigDict) -> step_lib.StepConfig:
  t = config.train
  return step_lib.StepConfig(
    branch_rows=config.batch.branch_rows,
    trainable=t.trainable,
    ce_weight=t.ce_weight,
    kl_weight=t.kl_weight,
    kl_temperature=t.kl_temperature,
    loss_normalize=t.loss_normalize,
    seed=config.seed,
    worker_prompt_tokens=config.batch.worker_prompt_tokens,
    remat=t.remat,
    merge=t.merge,
    path=t.path,
  )


def optimizer_config(config: ConfigDict) -> step_lib.OptimizerConfig:
  return step_lib.OptimizerConfig(**config.optimizer.to_dict())


def lora_config(config: ConfigDict) -> LoRAConfig:
  """`config.lora` as a `LoRAConfig` (which refuses unknown targets).

  `lora.targets` names projections of `psynth_jax.model.lora.TARGETS`: the default
  q/k/v/o, and gate/up/down (dense MLPs only) on request, e.g.
  `--config.lora.targets="('q','k','v','o','gate','up','down')"`, or the flag once
  per target; an element "q,k" is split at its commas.
  """
  items = config.lora.targets
  items = (items,) if isinstance(items, str) else items
  targets = tuple(t.strip() for item in items for t in str(item).split(","))
  return LoRAConfig(**{**config.lora.to_dict(), "targets": targets})


def common_shape(shape: batching.BatchShape) -> batching.BatchShape:
  """The union of every host's batch shape: the global arrays of one step need one shape."""
  if jax.process_count() == 1:
    return shape
  from jax.experimental import multihost_utils

  shapes = multihost_utils.process_allgather(np.asarray(dataclasses.astuple(shape), np.int64))
  return batching.BatchShape(*(int(x) for x in np.max(shapes, axis=0)))


def mesh_config(config: ConfigDict) -> sharding.MeshConfig:
  rules = dict(sharding.DEFAULT_RULES)
  for name, axes in config.mesh.rules.items():  # "data,fsdp" | "fsdp" | "" (replicated)
    parts = tuple(a for a in axes.split(",") if a)
    rules[name] = None if not parts else parts[0] if len(parts) == 1 else parts
  return sharding.MeshConfig(tuple(config.mesh.shape), tuple(rules.items()))


# ---------------------------------------------------------------- setup
def load_base(config: ConfigDict, mesh, rules):
  """(sharded base Params, tokenizer, pad id, eos id)."""
  m = config.model
  if m.path:
    from psynth_jax.language_model import load_pretrained

    # Straight into the shards, tensor by tensor: no host holds the whole model.
    lm = load_pretrained(os.path.expanduser(m.path), m.dtype or None, mesh, rules)
    params = lm.params
    if m.tokenizer == "suite":
      tokenizer = SuiteTokenizer()
      return params, tokenizer, tokenizer.pad_token_id, tokenizer.eos_token_id
    if lm.tokenizer is None:
      raise ValueError(f"{m.path} has no tokenizer.json; set model.tokenizer='suite' if it is ours")
    return params, lm.tokenizer, lm.pad_id, lm.stop_ids[0] if lm.stop_ids else None
  model_config = ModelConfig(**m.init.to_dict())
  options = _compiler_options(config)
  args = (model_config, m.init_seed)
  params = sharding.sharded_initializer(init_params, mesh, rules, options, args)()
  params = with_fingerprint(params)  # initialised under jit: no fingerprint yet
  tokenizer = SuiteTokenizer()
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model.init.vocab_size must be >= {tokenizer.vocab_size} (suite tokenizer)")
  return params, tokenizer, tokenizer.pad_token_id, tokenizer.eos_token_id


def load_traces(config: ConfigDict, workdir: str) -> data.TraceSource:
  """The training split as tfds: a trace JSONL, or a task's problems with gold targets."""
  d = config.data
  tfds_dir = d.tfds_dir or os.path.join(workdir, "tfds")
  path = d.train_jsonl
  if d.source == "task":
    path = os.path.join(workdir, "traces", "train.jsonl")
  elif d.source != "jsonl":
    raise ValueError(f"data.source must be 'task' or 'jsonl', got {d.source!r}")
  if jax.process_index() == 0:
    if d.source == "task":
      task = tasks.get(d.task)
      problems = task.load(
        split="train", limit=d.num_examples, seed=d.task_seed, **d.task_options.to_dict()
      )
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w", encoding="utf-8") as f:
        for p in problems:
          f.write(json.dumps(data.gold_trace(task, p)) + "\n")
    else:  # fail before training starts, not at the first batch that names it
      if unknown := {r["task"] for r in data.read_jsonl(path)} - set(tasks.names()):
        raise ValueError(
          f"{path} names tasks that are not registered: {sorted(unknown)} (registered:"
          f" {tasks.names()}); register them (psynth_jax.tasks.register) before training"
        )
    data.build_dataset({"train": path}, tfds_dir)
  checkpoints._sync("psynth_traces_ready")
  return data.load_split(tfds_dir, "train")


def _compiler_options(config: ConfigDict) -> dict[str, Any] | None:
  fast = config.fast_compile and jax.default_backend() == "cpu"
  return {"xla_backend_optimization_level": 0} if fast else None


def init_state(
  model_config: ModelConfig,
  lora_config: LoRAConfig,
  mapper_kind: str,
  mapper_features: str,
  optimizer_config: step_lib.OptimizerConfig,
  trainable: str,
  seed: int,
  merge: str = "",
) -> step_lib.TrainState:
  """A fresh train state (module level with hashable arguments, so jit reuses its program).

  `merge`: the operator spec the mapper trains under; its own arrays (link tokens) join
  the trainable parameters, initialised as the spec says (its `seed=` option, default 0).
  """
  mapper = Mapper.create(mapper_kind, model_config.num_layers, mapper_features)
  lora = LoRAWeights.init(model_config, lora_config, seed)
  own = None
  if merge:
    own = operators.wrapping(merge, model_config, None).own_params()
  optimizer = step_lib.make_optimizer(optimizer_config, trainable)
  return step_lib.init_state(mapper, lora, optimizer, own)


def fetch(tree: Any) -> Any:
  """Replicated device arrays -> numpy on this host (works when they span several hosts)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


# ---------------------------------------------------------------- logging
def _row_step(line: str) -> float:
  """A metrics row's step; a half-written row (killed mid-write) counts as after everything."""
  try:
    return json.loads(line)["step"]
  except (json.JSONDecodeError, KeyError, TypeError):
    return float("inf")


class MetricsLog:
  """metrics.jsonl + TensorBoard on process 0; resuming drops rows after the restored step."""

  def __init__(self, workdir: str, start_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    if not self.active:
      return
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        rows = [line for line in f if _row_step(line) <= start_step]
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(rows)
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def write(self, row: dict[str, Any]) -> None:
    if not self.active:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    for name, value in row.items():
      if name != "step" and isinstance(value, int | float):
        self.writer.add_scalar(f"train/{name}", value, row["step"])
    self.writer.flush()

  def close(self) -> None:
    if self.active:
      self.writer.close()


class StopOnSigterm:
  """A context in which SIGTERM asks the loop to stop (`requested`) instead of killing
  the process; the previous handler comes back on exit. Only in a single-process run's
  main thread (the only place Python delivers signals)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> StopOnSigterm:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def plan_shapes(config, workdir, batcher, iterator, num_steps, d_model):
  """`batch.max_shapes` > 0 (bucketed): the run's planned batch shapes (`shape_plan`),
  from every global batch of its epochs; recorded in workdir/batch_shapes.json. [] = off."""
  limit = config.batch.max_shapes
  if not limit or not config.batch.bucketed:
    if limit:
      raise ValueError("batch.max_shapes bounds bucketed shapes: set batch.bucketed too")
    return []
  steps = iterator.steps_per_epoch
  batches = [
    idx for epoch in range(-(-num_steps // steps)) for idx in iterator.global_batches(epoch)
  ][:num_steps]
  needed = sorted({int(i) for idx in batches for i in idx})
  examples = iterator.source.__getitems__(needed)
  encoded = dict(zip(needed, batcher.encode_all(examples)[0], strict=True))
  met = [batcher.shape([encoded[int(i)] for i in idx]) for idx in batches]
  planned = shape_plan.plan(met, limit, d_model)
  added = shape_plan.overhead(met, planned, d_model)
  record = {
    "max_shapes": limit,
    "shapes_met": len(set(met)),
    "planned": [dataclasses.asdict(s) for s in planned],
    "added_cost": added,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "batch_shapes.json"), "w") as f:
      json.dump(record, f, indent=1)
    tqdm.tqdm.write(
      f"batch shapes: {len(set(met))} met by {len(met)} steps -> {len(planned)} planned"
      f" ({added:+.1%} padding cost)"
    )
  return planned


# ---------------------------------------------------------------- the loop
def train(config: ConfigDict, workdir: str, stop_after: int | None = None) -> TrainResult:
  """Trains (or resumes training) the mapper and LoRA; see the module docstring.

  Args:
    config: an experiment config (`psynth_jax/configs/*.py`).
    workdir: checkpoints, metrics, data and exports live here.
    stop_after: stop after this global step without a final checkpoint or
      export, as a kill would (tests of resuming).
  """
  dist = config.distributed
  sharding.maybe_initialize_distributed(
    dist.coordinator_address or None, dist.num_processes, dist.process_id, dist.auto
  )
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh_cfg = mesh_config(config)
  mesh, rules = sharding.make_mesh(mesh_cfg), mesh_cfg.rules
  base, tokenizer, pad_id, eos_id = load_base(config, mesh, rules)
  spec = batch_spec(config)
  if spec.branch_tokens + spec.synth_tokens > base.config.max_position_embeddings:
    raise ValueError("batch.branch_tokens + batch.synth_tokens exceed max_position_embeddings")
  batcher = batching.Batcher(tokenizer, spec, pad_id, eos_id if config.data.append_eos else None)
  lora_cfg = lora_config(config)
  check_targets(lora_cfg.targets, base.config)  # MLP targets need dense MLPs: fail before data

  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  global_batch = config.batch.per_device_batch_size * data_ways or config.batch.batch_size
  if global_batch % data_ways or global_batch % jax.process_count():
    raise ValueError(f"global batch {global_batch} must divide over {data_ways} data shards")
  local_batch = global_batch // jax.process_count()
  source = load_traces(config, workdir)
  iterator = data.BatchIterator(
    source,
    seed=config.seed,
    batch_size=global_batch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  num_steps = config.train.num_steps or config.train.num_epochs * iterator.steps_per_epoch

  init_args = (
    base.config,
    lora_cfg,
    config.mapper.kind,
    config.mapper.features,
    optimizer_config(config),
    config.train.trainable,
    config.seed,
    config.train.merge,
  )
  options = _compiler_options(config)
  state = sharding.sharded_initializer(init_state, mesh, rules, options, init_args)()
  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    config.checkpoint.max_to_keep,
    config.checkpoint.async_save,
  )
  skip_reasons: collections.Counter = collections.Counter()
  restored = ckpt.restore_latest(state)
  if restored is not None:
    start, state, data_state = restored
    iterator.set_state(data_state["iterator"])
    skip_reasons.update(data_state.get("skip_reasons", {}))
    logging.info("resumed from step %d of %s", start, ckpt.directory)
    if jax.process_index() == 0:
      tqdm.tqdm.write(f"resumed from step {start} of {ckpt.directory}")
  else:
    start = 0
  planned = plan_shapes(config, workdir, batcher, iterator, num_steps, base.config.hidden_size)
  log = MetricsLog(workdir, start)
  history, pending = [], []
  # One jitted step per merged-cache size (a static argument); jax compiles one program
  # per batch shape under each. Unbucketed batches have a single shape.
  step_fns: dict[int, Any] = {}
  shapes: set[batching.BatchShape] = set()
  bar = tqdm.tqdm(
    total=num_steps, initial=start, disable=jax.process_index() != 0, desc="train", unit="step"
  )
  compile_cache.listen()
  t_last, compiled_last, step = time.perf_counter(), compile_cache.counts(), start
  interrupted = False  # by SIGTERM: checkpointed at `step`, not exported
  with StopOnSigterm() as stop:
    for step in range(start + 1, num_steps + 1):
      encoded, reasons = batcher.encode_all(next(iterator))
      skip_reasons.update(reasons)
      shape = batcher.shape(encoded)
      if spec.bucketed:
        shape = common_shape(shape)
      if planned:
        shape = shape_plan.cover(shape, planned, base.config.hidden_size)
      batch = sharding.host_local_to_global(batcher.pack(encoded, local_batch, shape), mesh, rules)
      if shape not in shapes:
        shapes.add(shape)
        logging.info(
          "step %d: batch shape %d, %s (compiles a step program)", step, len(shapes), shape
        )
      if shape.branch_rows not in step_fns:
        step_fns[shape.branch_rows] = step_lib.make_train_step(
          dataclasses.replace(step_config(config), branch_rows=shape.branch_rows),
          optimizer_config(config),
          mesh,
          rules,
          state,
          base,
          batch,
          options,
        )
      state, metrics = step_fns[shape.branch_rows](state, base, batch)
      pending.append(metrics)
      bar.update(1)
      stopping = stop.requested  # read once: the row and the checkpoint agree
      if step % config.log_every == 0 or step == num_steps or step == start + 1 or stopping:
        rows = fetch(pending)
        now = time.perf_counter()
        dt = max(now - t_last, 1e-9)
        row = {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]}
        for k in ("examples", "tokens", "target_tokens"):
          row[f"{k}_per_s"] = float(sum(r[k] for r in rows)) / dt
        row.update(step=step, skipped_total=int(fetch(state.skipped)), seconds=dt)
        row["batch_shapes"] = len(shapes)  # distinct shapes (step programs) of this run so far
        # XLA compilation (or loads from the persistent cache) inside `seconds`
        compiled = compile_cache.counts()
        row["compile_s"] = compiled["compile_s"] - compiled_last["compile_s"]
        row["programs_compiled"] = compiled["compiled"] - compiled_last["compiled"]
        compiled_last = compiled
        row["skip_reasons"] = dict(skip_reasons)
        log.write(row)
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", skipped=row["skipped_total"])
        pending, t_last = [], time.perf_counter()
      if stop_after is not None and step >= stop_after:
        break
      if step % config.checkpoint.every == 0 or step == num_steps or stopping:
        position = {"iterator": iterator.get_state(), "skip_reasons": dict(skip_reasons)}
        ckpt.save(step, state, position, {"config": config.to_json_best_effort()})
      if stopping:
        tqdm.tqdm.write(f"SIGTERM: stopped after step {step}, checkpoint saved; rerun to resume")
        interrupted = True
        break
  bar.close()
  ckpt.wait()
  ckpt.close()
  log.close()
  export_dir = None
  finished = stop_after is None and not interrupted
  if finished and config.export.enabled and jax.process_index() == 0:
    folder = os.path.join(workdir, "export")
    export_dir = checkpoints.export(
      fetch(state.params), folder, config.model.path, config.train.merge, config.train.path
    )
  return TrainResult(state, step, history, dict(skip_reasons), export_dir, interrupted)
