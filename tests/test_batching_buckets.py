"""Bucketed batch shapes (`BatchSpec.bucketed`): the same tokens, loss and gradients as at the
budget shapes, a bounded set of shapes, the held-out CE unchanged, and a trainer run that
trains and resumes."""

import dataclasses
import functools
import json
import math

import jax
import numpy as np
import pytest

from psynth_jax import testing
from psynth_jax.configs import synthetic as synthetic_config
from psynth_jax.mapper import Mapper
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.train import batching, data, heldout, shape_plan, trainer
from psynth_jax.train import step as step_lib

TOK = SuiteTokenizer()
# Budgets well above the synthetic suite's lengths, so that every size has smaller buckets.
SPEC = batching.BatchSpec(
  max_branches=8,
  branch_tokens=128,
  branch_rows=512,
  synth_tokens=256,
  target_tokens=64,
  teacher_tokens=512,
  worker_prompt_tokens=80,
  bucketed=True,
)
FAST = {"xla_backend_optimization_level": 0}  # tiny model: compile time dominates
SIZES = [f.name for f in dataclasses.fields(batching.BatchShape)]


def _records(n, seed=0, max_workers=4):
  examples = synthetic.generate("train", n, seed, max_workers=max_workers)
  return [data.gold_trace(synthetic.TASK, e.problem()) for e in examples]


def _batcher(spec=SPEC):
  return batching.Batcher(TOK, spec, TOK.pad_token_id, TOK.eos_token_id)


def _full(spec=SPEC):
  return _batcher(dataclasses.replace(spec, bucketed=False))


@pytest.fixture(scope="module")
def base():
  config = testing.tiny_config(vocab_size=TOK.vocab_size, max_position_embeddings=1024)
  return testing.random_params(config)


def _trainables(config):
  """A mapper and LoRA moved off their identity init, so that both matter to the loss."""
  mapper = Mapper.create("affine", config.num_layers, seed=0)
  lora = LoRAWeights.init(config, LoRAConfig(rank=4), seed=0)
  rng = np.random.default_rng(1)
  return jax.tree.map(
    lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(np.float32), (mapper, lora)
  )


# ---------------------------------------------------------------- shapes
def test_buckets_are_powers_of_two_up_to_the_budget():
  assert batching.buckets(576) == (32, 64, 128, 256, 512, 576)
  assert batching.buckets(2048) == (32, 64, 128, 256, 512, 1024, 2048)
  assert batching.buckets(8, 1) == (1, 2, 4, 8) and batching.buckets(3, 1) == (1, 2, 3)
  assert batching.buckets(16) == (16,)  # a budget under the smallest bucket is its own
  assert [batching.bucket(n, 576) for n in (0, 1, 32, 33, 512, 513, 576)] == [
    32,
    32,
    32,
    64,
    512,
    576,
    576,
  ]


def _needed(encoded):
  """The sizes the kept examples need (what a shape must hold), W aside."""
  kept = [e for e in encoded if e is not None]

  def most(f):
    return max((f(e) for e in kept), default=0)

  return {
    "branches": most(lambda e: len(e["branches"])),
    "branch_tokens": most(lambda e: max(map(len, e["branches"]), default=0)),
    "branch_rows": most(lambda e: sum(map(len, e["branches"]))),
    "synth_tokens": most(lambda e: len(e["prompt"]) + len(e["target"])),
    "target_tokens": most(lambda e: len(e["target"])),
    "teacher_tokens": most(lambda e: len(e["teacher"]) + len(e["target"])),
  }


def test_a_bucketed_batch_holds_the_tokens_of_the_full_one_and_no_more():
  records = _records(3, seed=2) + [{**_records(1)[0], "branches": ["a"] * 9}]  # one skipped
  bucketed, reasons = _batcher()(records)
  full, full_reasons = _full()(records)
  assert reasons == full_reasons == {"too_many_branches": 1}
  shape = _batcher().shape(_batcher().encode_all(records)[0])
  needed = _needed(_batcher().encode_all(records)[0])
  budget = SPEC.budget
  for name, n in needed.items():  # the smallest bucket that holds the batch
    size, limit = getattr(shape, name), getattr(budget, name)
    minimum = 1 if name == "branches" else batching.MIN_BUCKET
    assert n <= size < limit and (size == minimum or size // 2 < n), (name, n, size)
  assert shape.worker_prompt_tokens == SPEC.worker_prompt_tokens  # a static step argument
  k, r = shape.branches, shape.worker_prompt_tokens + shape.branch_tokens
  t, y, p = shape.synth_tokens, shape.target_tokens, shape.teacher_tokens
  assert bucketed.branch_tokens.shape == (4, k, r) and bucketed.tokens.shape == (4, t)
  assert bucketed.labels.shape == (4, y) and bucketed.teacher_tokens.shape == (4, p)
  cut = {
    "branch_tokens": np.s_[:, :k, :r],
    "branch_mask": np.s_[:, :k, :r],
    "branch_start": np.s_[:, :k],
    "tokens": np.s_[:, :t],
    "mask": np.s_[:, :t],
    "teacher_tokens": np.s_[:, :p],
    "teacher_mask": np.s_[:, :p],
  }
  for name, value in vars(full).items():
    index = cut.get(name, np.s_[:, :y] if np.ndim(value) == 2 else np.s_[:])
    np.testing.assert_array_equal(getattr(bucketed, name), value[index], err_msg=name)
  # What was cut off is padding only: the same real tokens and scored targets.
  assert batching.token_counts(bucketed) == batching.token_counts(full)
  assert not np.any(full.weights[:, y:]) and not np.any(full.score_pos[:, y:])
  # Unbucketed, a spec's batches always have its budget shape.
  assert _full().shape(_full().encode_all(records)[0]) == budget


def test_the_shapes_are_a_bounded_set_and_each_the_smallest_that_fits():
  rng = np.random.default_rng(0)
  records = _records(64, seed=1, max_workers=8)
  for r in records:  # "." is one token per character: lengths over the whole range
    k = int(rng.integers(1, 9))
    r["branches"] = ["." * int(rng.integers(0, 60)) for _ in range(k)]
    r["target"] = "." * int(rng.integers(1, 60))
    r.pop("worker_prompts")
  spec = dataclasses.replace(SPEC, worker_prompt_tokens=0)
  batcher = _batcher(spec)
  allowed = {
    name: set(batching.buckets(limit, 1 if name == "branches" else batching.MIN_BUCKET))
    for name, limit in dataclasses.asdict(spec.budget).items()
  }
  allowed["worker_prompt_tokens"] = {0}
  shapes = set()
  for _ in range(20):
    chunk = [records[i] for i in rng.choice(len(records), size=3, replace=False)]
    encoded, _ = batcher.encode_all(chunk)
    shape = batcher.shape(encoded)
    shapes.add(shape)
    for name in SIZES:
      assert getattr(shape, name) in allowed[name], (name, shape)
    for name, n in _needed(encoded).items():
      assert getattr(shape, name) >= n
  assert 1 < len(shapes) <= math.prod(len(v) for v in allowed.values())
  # Hosts of one step agree on the union, itself a bucketed shape that holds them all.
  union = functools.reduce(batching.BatchShape.union, shapes)
  for name in SIZES:
    assert getattr(union, name) == max(getattr(s, name) for s in shapes)


def test_a_shape_plan_holds_every_batch_in_at_most_max_shapes():
  rng = np.random.default_rng(2)
  sizes = [(1, 2, 4, 8), (32, 64, 128), (0,), (32, 128, 512), (64, 128, 256), (32, 64), (0,)]
  met = [batching.BatchShape(*(int(rng.choice(v)) for v in sizes)) for _ in range(200)]
  for limit in (1, 3, 8, 500):
    planned = shape_plan.plan(met, limit, d_model=64)
    assert len(planned) == min(limit, len(set(met)))
    for shape in met:
      got = shape_plan.cover(shape, planned, 64)
      assert shape_plan.holds(got, shape)
      # the cheapest planned shape that holds it
      assert all(
        shape_plan.cost(got, 64) <= shape_plan.cost(p, 64)
        for p in planned
        if shape_plan.holds(p, shape)
      )
    added = shape_plan.overhead(met, planned, 64)
    assert (added == 0) == (limit >= len(set(met))) and added >= 0
  assert shape_plan.plan(met, 1, 64) == [functools.reduce(batching.BatchShape.union, met)]
  # fewer shapes never cost less padding
  costs = [shape_plan.overhead(met, shape_plan.plan(met, n, 64), 64) for n in (2, 4, 8, 16)]
  assert costs == sorted(costs, reverse=True)
  with pytest.raises(ValueError, match="fits none"):
    shape_plan.cover(batching.BatchShape(16, 32, 0, 32, 64, 32, 0), planned, 64)


def test_global_batches_are_what_the_iterator_yields():
  source = list(range(23))
  for drop in (True, False):
    it = data.BatchIterator(
      source, seed=3, batch_size=4, process_index=0, process_count=1, drop_remainder=drop
    )
    planned = [list(b) for e in range(2) for b in it.global_batches(e)]
    assert [next(it) for _ in planned] == planned
    assert len(planned) == 2 * it.steps_per_epoch


# ---------------------------------------------------------------- the loss
@functools.partial(jax.jit, static_argnums=3, compiler_options=FAST)
def _loss_and_grads(params, base, batch, config):
  grad_fn = jax.value_and_grad(step_lib.loss_fn, has_aux=True)
  (loss, metrics), grads = grad_fn(params, base, batch, jax.random.key(0), config)
  return loss, metrics, grads


def _assert_same(got, want):
  (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = got, want
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name in ref_metrics:
    np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
  leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
  assert any(np.abs(g).max() > 1e-3 for g in ref_leaves)  # the gradients are not all zero
  for g, ref in zip(leaves, ref_leaves, strict=True):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * max(np.abs(ref).max(), 1e-3))


def test_bucketed_batches_give_the_loss_and_gradients_of_the_budget_shapes(base):
  """CE + KL to the teacher, worker prompts, a padding branch, a skipped example: float32."""
  records = _records(3, seed=3) + [{**_records(1)[0], "target": "." * 80}]  # target too long
  bucketed, _ = _batcher()(records)
  full, _ = _full()(records)
  shape = _batcher().shape(_batcher().encode_all(records)[0])
  assert shape.branches < SPEC.max_branches and shape.branch_rows < SPEC.branch_rows
  params = dict(zip(("mapper", "lora"), _trainables(base.config), strict=True))
  config = step_lib.StepConfig(
    branch_rows=SPEC.branch_rows, kl_weight=0.5, worker_prompt_tokens=SPEC.worker_prompt_tokens
  )
  want = _loss_and_grads(params, base, full, config)
  small = dataclasses.replace(config, branch_rows=shape.branch_rows)
  # A smaller merged cache drops padding rows only ...
  _assert_same(_loss_and_grads(params, base, full, small), want)
  # ... and so do the bucketed shapes of every array.
  _assert_same(_loss_and_grads(params, base, bucketed, small), want)
  _assert_same(_loss_and_grads(params, base, bucketed, config), want)


def test_held_out_ce_is_the_same_on_bucketed_batches(base):
  records = _records(5, seed=4)
  arms = {"naive_merge": (None, None), "adapted": _trainables(base.config)}
  got = heldout.evaluate(base, _batcher(), records, arms, batch_size=2, progress=False)
  want = heldout.evaluate(base, _full(), records, arms, batch_size=2, progress=False)
  assert got["tasks"].keys() == want["tasks"].keys() and got["skipped"] == want["skipped"]
  for task, row in want["tasks"].items():
    for name, value in row.items():
      np.testing.assert_allclose(got["tasks"][task][name], value, rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------- the trainer
def _config(bucketed=True, num_steps=6):
  config = synthetic_config.get_config("random,fast")
  config.model.init.update(num_layers=1, hidden_size=32, intermediate_size=64)
  config.data.num_examples = 24
  config.data.task_options.update(min_workers=2, max_workers=5)
  config.batch.update(
    batch_size=4, max_branches=4, branch_rows=160, synth_tokens=112, target_tokens=48
  )
  config.batch.bucketed = bucketed
  config.lora.rank = 4
  config.train.num_steps = num_steps
  config.optimizer.learning_rate = 1e-2
  config.mesh.shape = (1, 1, 1)
  config.checkpoint.every = 2
  config.log_every = 1
  config.export.enabled = False
  return config


def _params(result):
  return jax.tree.map(np.asarray, trainer.fetch(result.state.params))


def test_a_bucketed_trainer_run_trains_and_resumes(tmp_path):
  run = trainer.train(_config(), str(tmp_path / "run"))
  losses = [row["loss"] for row in run.history]
  assert len(losses) == 6 and all(math.isfinite(x) and x > 0 for x in losses)
  assert losses[-1] < losses[0]
  spec = trainer.batch_spec(_config())
  bound = math.prod(
    len(batching.buckets(limit, 1 if name == "branches" else batching.MIN_BUCKET))
    for name, limit in dataclasses.asdict(spec.budget).items()
    if limit
  )
  shapes = [row["batch_shapes"] for row in run.history]
  assert shapes == sorted(shapes) and 1 < shapes[-1] <= bound
  # The same examples at the budget shapes: the same losses (float32) and real-token counts.
  full = trainer.train(_config(bucketed=False), str(tmp_path / "full"))
  assert [row["batch_shapes"] for row in full.history] == [1] * 6
  for got, want in zip(run.history, full.history, strict=True):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert got["skipped"] == want["skipped"]
    assert got["tokens"] == want["tokens"] and got["target_tokens"] == want["target_tokens"]
  # Killed after step 3 (last save at 2) and resumed: the uninterrupted run's parameters.
  workdir = str(tmp_path / "resumed")
  stopped = trainer.train(_config(), workdir, stop_after=3)
  assert stopped.step == 3
  resumed = trainer.train(_config(), workdir)
  assert [row["step"] for row in resumed.history] == [3, 4, 5, 6]
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(run))
  for got, want in zip(resumed.history, run.history[2:], strict=True):
    assert got["loss"] == want["loss"]
  # At most two planned shapes: the same losses again, from fewer step programs.
  config = _config()
  config.batch.max_shapes = 2
  two = trainer.train(config, str(tmp_path / "two"))
  assert two.history[-1]["batch_shapes"] <= 2 < run.history[-1]["batch_shapes"]
  record = json.loads((tmp_path / "two" / "batch_shapes.json").read_text())
  assert len(record["planned"]) == 2 and record["shapes_met"] == run.history[-1]["batch_shapes"]
  for got, want in zip(two.history, run.history, strict=True):
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)


def test_the_stage_configs_bucket_and_the_others_do_not():
  from psynth_jax.configs import base as base_config
  from psynth_jax.configs import smollm2_135m

  assert not base_config.default_config().batch.bucketed
  assert not synthetic_config.get_config("random,fast").batch.bucketed
  for stage in ("stage1", "stage2", "stage1,kl,quarter"):
    assert trainer.batch_spec(smollm2_135m.get_config(stage)).bucketed
