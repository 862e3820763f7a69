"""Tests for the train step: batching guards, losses, what trains, parity with inference."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax import tasks
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import TARGETS, LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import abstract_params, forward, params_from_flat
from psynth_jax.synthesis import synthesis_logits
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.train import batching, data, losses
from psynth_jax.train import step as step_lib
from psynth_jax.workers import encode_branches

TOK = SuiteTokenizer()
CONFIG = ModelConfig("llama", TOK.vocab_size, 64, 128, 2, 4, 2, 16, max_position_embeddings=1024)
SPEC = batching.BatchSpec(
  max_branches=4,
  branch_tokens=64,
  branch_rows=160,
  synth_tokens=112,
  target_tokens=16,
  teacher_tokens=256,
)
FAST = {"xla_backend_optimization_level": 0}  # tiny model: compile time dominates


def _records(n, seed=0, worker_prompts=False):
  examples = synthetic.generate("train", n, seed, max_workers=SPEC.max_branches)
  records = [data.gold_trace(synthetic.TASK, e.problem()) for e in examples]
  if not worker_prompts:
    for r in records:
      del r["worker_prompts"]
  return records


def _batcher(spec=SPEC):
  return batching.Batcher(TOK, spec, TOK.pad_token_id, TOK.eos_token_id)


@pytest.fixture(scope="module")
def base():
  """Random weights drawn with numpy: compiling jax's initialisers costs more than the tests."""
  rng = np.random.default_rng(0)
  flat = {}
  for path, var in nnx.to_flat_state(abstract_params(CONFIG).state):
    name, shape = ".".join(str(p) for p in path), var.get_value().shape
    flat[name] = np.ones(shape) if name.endswith("scale") else rng.normal(size=shape) * 0.1
  return params_from_flat(CONFIG, flat)


@pytest.fixture(scope="module")
def batch():
  host, reasons = _batcher()(_records(4))
  assert not reasons
  return host


def _trainables(seed=0, perturb=0.0):
  """A mapper and LoRA; with `perturb`, moved off their identity init so they matter."""
  mapper = Mapper.create("affine", CONFIG.num_layers, seed=seed)
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=4), seed=seed)
  if perturb:
    rng = np.random.default_rng(seed + 1)
    mapper, lora = jax.tree.map(
      lambda x: np.asarray(x) + perturb * rng.normal(size=x.shape).astype(np.float32),
      (mapper, lora),
    )
  return mapper, lora


@functools.cache
def _step_fn(trainable: str, lr: float):
  opt_config = step_lib.OptimizerConfig(learning_rate=lr)
  optimizer = step_lib.make_optimizer(opt_config, trainable)
  config = step_lib.StepConfig(branch_rows=SPEC.branch_rows, trainable=trainable)
  return optimizer, step_lib.make_train_step(config, opt_config, compiler_options=FAST)


def _copy(tree):
  return jax.tree.map(np.array, tree)


# ---------------------------------------------------------------- batching
def test_targets_align_with_student_and_teacher_positions(batch):
  records = _records(4)
  for row, record in enumerate(records):
    n = int(batch.weights[row].sum())
    target = TOK.encode(record["target"])
    assert target[-1] == TOK.eos_token_id and n == len(target)
    labels = batch.labels[row, :n]
    np.testing.assert_array_equal(labels, target)
    # The logits at score_pos / teacher_pos predict the next token: the label.
    np.testing.assert_array_equal(batch.tokens[row, batch.score_pos[row, :n] + 1], labels)
    np.testing.assert_array_equal(batch.teacher_tokens[row, batch.teacher_pos[row, :n] + 1], labels)
    prompt = TOK.decode(batch.tokens[row, : batch.score_pos[row, 0] + 1])
    assert prompt == record["synth_prompt"]
    k = len(record["branches"])
    assert batch.num_workers[row] == k
    for i, text in enumerate(record["branches"]):  # as the worker wrote it: after a space
      assert TOK.decode(batch.branch_tokens[row, i][batch.branch_mask[row, i]]) == " " + text
    assert not batch.branch_mask[row, k:].any()  # padding branches are empty


def test_oversize_examples_are_skipped_and_counted():
  good = _records(1)[0]
  cases = {
    "too_many_branches": {"branches": ["a"] * (SPEC.max_branches + 1)},
    # "." is one token per character in the suite vocabulary (a word is one token).
    "branch_too_long": {"branches": ["." * (SPEC.branch_tokens + 1)]},
    "branches_over_budget": {"branches": ["." * 60] * 3},
    "target_too_long": {"target": "." * SPEC.target_tokens},
    "empty_target": {"target": ""},
    "synth_too_long": {"synth_prompt": "." * (SPEC.synth_tokens - 2)},
    "teacher_too_long": {"question": "." * SPEC.teacher_tokens, "synth_prompt": "s"},
  }
  examples = [good] + [{**good, **change} for change in cases.values()] + [good]
  host, reasons = _batcher()(examples, batch_size=len(examples) + 2)
  assert dict(reasons) == {reason: 1 for reason in cases}
  np.testing.assert_array_equal(host.skipped, [0] + [1] * len(cases) + [0, 0, 0])
  assert host.weights[1:-3].sum() == 0 and not host.branch_mask[1:-3].any()
  assert host.weights[0].sum() > 0 and host.weights[-3].sum() > 0
  with pytest.raises(ValueError, match="do not fit"):
    _batcher()(examples, batch_size=2)


# ---------------------------------------------------------------- losses
def test_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
  weights = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
  kl = jax.jit(losses.kl_to_teacher, static_argnums=3)
  assert abs(float(kl(logits, logits, weights, 2.0))) < 1e-6
  other = logits + rng.normal(size=logits.shape).astype(np.float32)
  assert float(kl(other, logits, weights, 1.0)) > 0.01
  # Padding positions do not count, however wrong they are.
  garbage = other.copy()
  garbage[0, 2], garbage[1, 1:] = 1e3, -1e3
  np.testing.assert_allclose(kl(garbage, logits, weights, 1.0), kl(other, logits, weights, 1.0))


def test_loss_normalisations_match_a_plain_computation_and_agree_at_batch_one():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
  labels = rng.integers(0, 7, (3, 4))
  weights = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)  # row 3: skipped
  log_q = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(log_q, labels[..., None], -1)[..., 0]  # [B, N]
  per_example = [ce[0].mean(), ce[1, 0]]  # the skipped row does not count
  want = {"example": np.mean(per_example), "token": (ce * weights).sum() / weights.sum()}
  for normalize, value in want.items():
    got = losses.cross_entropy(logits, labels, weights, normalize)
    np.testing.assert_allclose(got, value, rtol=1e-5)
  assert abs(want["example"] - want["token"]) > 1e-3  # the test tells them apart
  one = (logits[:1], labels[:1], weights[:1] * np.array([1, 1, 0, 1], np.float32))
  np.testing.assert_allclose(
    losses.cross_entropy(*one, "example"), losses.cross_entropy(*one, "token"), rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.kl_to_teacher(
      logits[:1], logits[:1] + 1.0 * labels[:1, :, None], weights[:1], 1.0, "example"
    ),
    losses.kl_to_teacher(
      logits[:1], logits[:1] + 1.0 * labels[:1, :, None], weights[:1], 1.0, "token"
    ),
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="normalize"):
    losses.cross_entropy(logits, labels, weights, "batch")
  with pytest.raises(ValueError, match="loss_normalize"):
    step_lib.StepConfig(branch_rows=8, loss_normalize="batch")


def test_teacher_logits_are_the_base_model_over_the_text_prompt(base, batch):
  @jax.jit
  def both(base, batch):
    positions = jnp.broadcast_to(
      jnp.arange(batch.teacher_tokens.shape[1]), batch.teacher_mask.shape
    )
    full = forward(base, batch.teacher_tokens, positions, None, batch.teacher_mask)[0]
    return step_lib.teacher_logits(base, batch), full

  got, full = both(base, jax.tree.map(jnp.asarray, batch))
  for row in range(len(batch.weights)):
    n = int(batch.weights[row].sum())
    np.testing.assert_allclose(got[row, :n], full[row, batch.teacher_pos[row, :n]], atol=1e-5)


def test_training_logits_equal_the_inference_path(base, batch):
  """The loss reads the same logits that `synthesis_logits` (inference) computes."""
  mapper, lora = _trainables(perturb=0.05)
  lm = LanguageModel(base, TOK, (TOK.eos_token_id,), TOK.pad_token_id)

  @jax.jit
  def train_logits(base, batch, mapper, lora):
    from psynth_jax.synthesis import latent_hidden

    branches = step_lib.encode_branch_batch(base, batch.branch_tokens, batch.branch_mask)
    x = latent_hidden(
      base, branches, batch.tokens, batch.mask, mapper, lora, SPEC.branch_rows, batch.num_workers
    )
    return lm.params.module().unembed(losses.gather_positions(x, batch.score_pos))

  got = train_logits(base, jax.tree.map(jnp.asarray, batch), mapper, lora)
  row = 1
  k = int(batch.num_workers[row])
  token_lists = [batch.branch_tokens[row, i][batch.branch_mask[row, i]].tolist() for i in range(k)]
  branches = encode_branches(lm, token_lists)
  sequence = batch.tokens[row][batch.mask[row]].tolist()
  want = synthesis_logits(lm, branches, sequence, mapper, lora)
  n = int(batch.weights[row].sum())
  np.testing.assert_allclose(got[row, :n], want[batch.score_pos[row, :n]], atol=2e-4)


# ---------------------------------------------------------------- the step
@pytest.mark.parametrize("trainable", ["both", "mapper_only", "lora_only"])
def test_only_the_chosen_part_trains_and_loss_falls(trainable, base, batch):
  optimizer, step_fn = _step_fn(trainable, 1e-2)
  mapper, lora = _trainables()
  state = step_lib.init_state(mapper, lora, optimizer)
  before, base_before = _copy(state.params), _copy(base)
  device_batch = jax.tree.map(jnp.asarray, batch)
  steps = 12 if trainable == "both" else 3
  history = []
  for _ in range(steps):
    state, metrics = step_fn(state, base, device_batch)
    history.append(float(metrics["loss"]))
  after = _copy(state.params)
  jax.tree.map(np.testing.assert_array_equal, _copy(base), base_before)
  for part in ("mapper", "lora"):
    changed = [
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part]), strict=True)
    ]
    trains = trainable in ("both", f"{part}_only")
    assert any(changed) == trains, (part, changed)
  assert int(state.step) == steps and int(state.skipped) == 0
  assert history[-1] < history[0]
  if trainable == "both":  # overfitting one batch of 4 examples
    assert history[-1] < 0.7 * history[0], history


def test_lora_on_the_mlp_projections_trains(base, batch):
  """gate / up / down next to q/k/v/o: every B leaves zero and the loss falls."""
  optimizer, step_fn = _step_fn("lora_only", 1e-2)
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=4, targets=TARGETS))
  state = step_lib.init_state(Mapper.create("affine", CONFIG.num_layers), lora, optimizer)
  device_batch = jax.tree.map(jnp.asarray, batch)
  history = []
  for _ in range(3):
    state, metrics = step_fn(state, base, device_batch)
    history.append(float(metrics["loss"]))
  after = state.params["lora"]
  assert after.config.targets == TARGETS
  for t in TARGETS:
    a, b = (np.asarray(x) for x in after.arrays(t))
    assert np.abs(b).max() > 0, t
    assert not np.array_equal(a, np.asarray(lora.arrays(t)[0])), t  # B != 0 after step 1
  assert history[-1] < history[0], history


def test_a_rematerialised_step_computes_the_same_update(base, batch):
  """remat (synthesizer layers and the merge) trades memory for recomputation, nothing else."""
  opt_config = step_lib.OptimizerConfig(learning_rate=1e-2)
  optimizer = step_lib.make_optimizer(opt_config, "both")
  device_batch = jax.tree.map(jnp.asarray, batch)
  results = {}
  for policy in ("none", "full"):
    config = step_lib.StepConfig(branch_rows=SPEC.branch_rows, remat=policy)
    step_fn = step_lib.make_train_step(config, opt_config, compiler_options=FAST)
    state = step_lib.init_state(*_trainables(perturb=0.05), optimizer)
    state, metrics = step_fn(state, base, device_batch)
    results[policy] = float(metrics["loss"]), float(metrics["grad_norm"]), _copy(state.params)
  (loss, norm, params), (ref_loss, ref_norm, ref_params) = results["full"], results["none"]
  np.testing.assert_allclose([loss, norm], [ref_loss, ref_norm], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_a_step_under_a_merge_operator(base, batch, tmp_path):
  """train.merge: the mapper and LoRA train inside another operator; at the operator's
  identity setting the update is the paper's, and the export loads back as the operator."""
  from psynth_jax import operators
  from psynth_jax.train import checkpoints

  opt_config = step_lib.OptimizerConfig(learning_rate=1e-2)
  optimizer = step_lib.make_optimizer(opt_config, "both")
  device_batch = jax.tree.map(jnp.asarray, batch)
  results = {}
  for merge in ("", "ape", "recompute:fraction=0.5"):
    config = step_lib.StepConfig(branch_rows=SPEC.branch_rows, merge=merge)
    step_fn = step_lib.make_train_step(config, opt_config, compiler_options=FAST)
    start = step_lib.init_state(*_trainables(perturb=0.05), optimizer)
    before = _copy(start.params)  # the step donates its input state
    state, metrics = step_fn(start, base, device_batch)
    results[merge] = float(metrics["loss"]), _copy(state.params)
    for part in ("mapper", "lora"):
      pairs = zip(
        jax.tree.leaves(before[part]), jax.tree.leaves(results[merge][1][part]), strict=True
      )
      assert any(not np.array_equal(x, y) for x, y in pairs), (merge, part)
  assert results["ape"][0] == results[""][0]
  for got, want in zip(
    jax.tree.leaves(results["ape"][1]), jax.tree.leaves(results[""][1]), strict=True
  ):
    np.testing.assert_array_equal(got, want)
  loss = results["recompute:fraction=0.5"][0]
  assert np.isfinite(loss) and loss != results[""][0]
  folder = checkpoints.export(
    results[""][1], str(tmp_path / "export"), merge="recompute:fraction=0.5"
  )
  op, lora = checkpoints.load_export(folder, CONFIG)
  assert isinstance(op, operators.Recompute) and op.fraction == 0.5 and op.mapper.kind == "affine"
  with pytest.raises(ValueError, match="unknown merge operator"):
    step_lib.StepConfig(branch_rows=SPEC.branch_rows, merge="blend")


def _text_ce_reference(base, batch, lora):
  """The example-normalised target CE of a plain forward (with `lora`) over the teacher text."""
  positions = np.broadcast_to(np.arange(batch.teacher_tokens.shape[1]), batch.teacher_mask.shape)
  logits, _ = jax.jit(forward)(
    base, jnp.asarray(batch.teacher_tokens), positions, None, batch.teacher_mask, lora
  )
  logits = np.asarray(logits, np.float64)
  means = []
  for row in range(len(batch.weights)):
    n = int(batch.weights[row].sum())
    rows = logits[row, batch.teacher_pos[row, :n]]
    log_z = np.log(np.exp(rows - rows.max(-1, keepdims=True)).sum(-1)) + rows.max(-1)
    means.append(np.mean(log_z - rows[np.arange(n), batch.labels[row, :n]]))
  return float(np.mean(means))


def test_the_text_arm_trains_a_lora_on_the_text_synthesizer(base, batch, tmp_path):
  """path="text": the loss is the CE of the base + LoRA over the branches pasted as text
  (a plain forward's), branch caches play no part, only the LoRA learns, and its export
  refuses to load as a cache adapter."""
  from psynth_jax import configs
  from psynth_jax.train import checkpoints, trainer

  opt_config = step_lib.OptimizerConfig(learning_rate=1e-2)
  config = step_lib.StepConfig(branch_rows=SPEC.branch_rows, trainable="lora_only", path="text")
  mapper, lora = _trainables(perturb=0.05)
  device_batch = jax.tree.map(jnp.asarray, batch)
  loss_fn = jax.jit(step_lib.loss_fn, static_argnums=4)
  params = {"mapper": mapper, "lora": lora}
  loss, _ = loss_fn(params, base, device_batch, jax.random.key(0), config)
  np.testing.assert_allclose(float(loss), _text_ce_reference(base, batch, lora), rtol=1e-5)
  scrambled = device_batch.replace(branch_tokens=jnp.zeros_like(device_batch.branch_tokens))
  assert float(loss_fn(params, base, scrambled, jax.random.key(0), config)[0]) == float(loss)

  optimizer = step_lib.make_optimizer(opt_config, "lora_only")
  step_fn = step_lib.make_train_step(config, opt_config, compiler_options=FAST)
  state = step_lib.init_state(*_trainables(), optimizer)
  before = _copy(state.params)
  history = []
  for _ in range(3):
    state, metrics = step_fn(state, base, device_batch)
    history.append(float(metrics["loss"]))
  assert history[-1] < history[0], history
  assert int(metrics["tokens"]) == int(batch.teacher_mask.sum())
  after = _copy(state.params)
  jax.tree.map(np.testing.assert_array_equal, after["mapper"], before["mapper"])
  assert any(
    not np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(after["lora"]), jax.tree.leaves(before["lora"]), strict=True)
  )

  folder = checkpoints.export(after, str(tmp_path / "text"), synthesizer="text")
  assert not (tmp_path / "text" / "mapper" / "mapper.safetensors").exists()  # no mapper kept
  with pytest.raises(ValueError, match="text synthesizer"):
    checkpoints.load_export(folder, CONFIG)
  none, loaded = checkpoints.load_export(folder, CONFIG, synthesizer="text")
  assert none is None
  for t in loaded.config.targets:
    for got, want in zip(loaded.arrays(t), after["lora"].arrays(t), strict=True):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  cache_export = checkpoints.export(after, str(tmp_path / "cache"))
  with pytest.raises(ValueError, match="cache synthesizer"):
    checkpoints.load_export(cache_export, CONFIG, synthesizer="text")

  for bad in (dict(trainable="both"), dict(trainable="lora_only", kl_weight=0.5)):
    with pytest.raises(ValueError, match="path='text'"):
      step_lib.StepConfig(branch_rows=8, path="text", **bad)
  with pytest.raises(ValueError, match="path must be"):
    step_lib.StepConfig(branch_rows=8, path="texts")
  stage1 = "psynth_jax/configs/smollm2_135m.py:stage1"
  assert trainer.batch_spec(configs.load(stage1)).teacher_tokens == 0  # no KL: no teacher
  c = configs.load(stage1 + ",text")  # the stage configs' control arm
  assert trainer.batch_spec(c).teacher_tokens == c.batch.teacher_tokens > 0
  assert trainer.step_config(c).path == "text" and c.train.trainable == "lora_only"


def test_link_tokens_train_and_export(base, batch, tmp_path):
  """Under `links` the operator's own arrays train with the mapper: one step moves the
  link vectors and the gate, the export loads back as the trained operator, and a
  missing or misshapen operator file is refused."""
  from psynth_jax import operators
  from psynth_jax.train import checkpoints

  spec = "links:num_links=2"
  own = operators.wrapping(spec, CONFIG, None).own_params()
  opt_config = step_lib.OptimizerConfig(learning_rate=1e-2)
  state = step_lib.init_state(
    *_trainables(perturb=0.05), step_lib.make_optimizer(opt_config, "both"), own
  )
  before = _copy(state.params["operator"])
  config = step_lib.StepConfig(branch_rows=SPEC.branch_rows, merge=spec)
  step_fn = step_lib.make_train_step(config, opt_config, compiler_options=FAST)
  state, metrics = step_fn(state, base, jax.tree.map(jnp.asarray, batch))
  assert np.isfinite(float(metrics["loss"]))
  params = _copy(state.params)
  for name in ("embeddings", "gate"):
    assert not np.array_equal(getattr(before, name), getattr(params["operator"], name)), name
  folder = checkpoints.export(params, str(tmp_path / "export"), merge=spec)
  op, _ = checkpoints.load_export(folder, CONFIG)
  assert isinstance(op, operators.Links) and op.mapper.kind == "affine"
  np.testing.assert_array_equal(np.asarray(op.embeddings), params["operator"].embeddings)
  np.testing.assert_array_equal(np.asarray(op.gate), params["operator"].gate)
  wrong = checkpoints.export(params, str(tmp_path / "wrong"), merge="links:num_links=3")
  with pytest.raises(ValueError, match="shape"):
    checkpoints.load_export(wrong, CONFIG)
  (tmp_path / "export" / "mapper" / checkpoints.OPERATOR_FILE).unlink()
  with pytest.raises(FileNotFoundError, match="operator"):
    checkpoints.load_export(folder, CONFIG)


def test_a_batch_of_skipped_examples_changes_nothing(base, batch):
  optimizer, step_fn = _step_fn("both", 1e-2)
  state = step_lib.init_state(*_trainables(), optimizer)
  state, _ = step_fn(state, base, jax.tree.map(jnp.asarray, batch))  # non-zero Adam moments
  before = _copy((state.params, state.opt_state))
  empty = batch.replace(weights=np.zeros_like(batch.weights), skipped=np.ones_like(batch.skipped))
  state, metrics = step_fn(state, base, jax.tree.map(jnp.asarray, empty))
  jax.tree.map(np.testing.assert_array_equal, _copy((state.params, state.opt_state)), before)
  assert int(metrics["skipped"]) == 4 and int(state.skipped) == 4 and int(state.step) == 2


def test_a_lora_or_mapper_of_another_model_fails_while_tracing(base, batch):
  optimizer, _ = _step_fn("both", 1e-2)
  config = step_lib.StepConfig(branch_rows=SPEC.branch_rows)
  step = functools.partial(
    step_lib.train_step, config=config, optimizer_config=step_lib.OptimizerConfig(1e-2)
  )
  mapper, lora = _trainables()
  deeper_lora = LoRAWeights.init(CONFIG.replace(num_layers=3), LoRAConfig(rank=4))
  deeper_mapper = Mapper.create("affine", 3)
  for trainables, match in (
    ((mapper, deeper_lora), "LoRA adapter does not fit"),
    ((deeper_mapper, lora), "made for 3 layers"),
  ):
    state = step_lib.init_state(*trainables, optimizer)
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(step, state, base, batch)


def test_optimizer_options():
  cfg = step_lib.OptimizerConfig(
    learning_rate=1.0, schedule="warmup_cosine", warmup_steps=10, decay_steps=100
  )
  schedule = step_lib.make_schedule(cfg)
  assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - 1.0) < 1e-6
  assert float(schedule(110)) < 1e-6
  accum = step_lib.make_optimizer(step_lib.OptimizerConfig(grad_accum_steps=2), "lora_only")
  params = {"mapper": {"w": np.zeros(3, np.float32)}, "lora": {"a": np.zeros(2, np.float32)}}
  grads = jax.tree.map(np.ones_like, params)
  update = jax.jit(accum.tx.update)
  state = accum.tx.init(params)
  first, state = update(grads, state, params)  # accumulated, not applied yet
  second, state = update(grads, state, params)
  assert not np.any(first["lora"]["a"]) and np.all(np.asarray(second["lora"]["a"]) < 0)
  assert not np.any(first["mapper"]["w"]) and not np.any(second["mapper"]["w"])  # frozen
  with pytest.raises(ValueError, match="trainable"):
    step_lib.StepConfig(branch_rows=8, trainable="base")


def test_branches_after_worker_prompts_are_the_caches_the_workers_wrote(base):
  """encode_branch_batch with worker prompts == run_workers' own branch caches."""
  from psynth_jax.merge import reencode
  from psynth_jax.workers import run_workers

  lm = LanguageModel(base, TOK, TOK.eos_token_ids, TOK.pad_token_id)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(5, 60, size=n)) for n in (7, 12, 3)]
  workers = run_workers(lm, prompts, max_new_tokens=9)
  w, s = 16, workers.branches.capacity
  rows = np.full((1, 3, w + s), TOK.pad_token_id, np.int32)
  mask = np.zeros(rows.shape, bool)
  for i, (prompt, out) in enumerate(zip(prompts, workers.tokens, strict=True)):
    rows[0, i, : len(prompt) + len(out)] = prompt + out
    mask[0, i, : len(prompt) + len(out)] = True
  start = np.asarray([[len(p) for p in prompts]], np.int32)
  got = step_lib.encode_branch_batch(base, jnp.asarray(rows), jnp.asarray(mask), start, w)
  want = workers.branches
  np.testing.assert_array_equal(got.lengths[0], want.lengths)
  for i, out in enumerate(workers.tokens):
    np.testing.assert_array_equal(got.tokens[0, i, : len(out)], out)
  for layer in range(CONFIG.num_layers):
    for name in ("k", "v"):
      a, b = getattr(got.cache, name)[layer][0], getattr(want.cache, name)[layer]
      if name == "k":  # both at position 0 after re-encoding (the offsets differ)
        a, b = reencode(a, got.offsets[0], CONFIG), reencode(b, want.offsets, CONFIG)
      for i, n in enumerate(np.asarray(want.lengths)):
        np.testing.assert_allclose(a[i, :, :n], b[i, :, :n], atol=2e-5)
  # Without prompts (start 0, W = 0) it is encode_branches, as before.
  plain = step_lib.encode_branch_batch(
    base, jnp.asarray(rows[..., :s]), jnp.asarray(mask[..., :s]), np.zeros((1, 3), np.int32)
  )
  ref = encode_branches(
    lm, [list(r[m]) for r, m in zip(rows[0, :, :s], mask[0, :, :s], strict=True)], s
  )
  np.testing.assert_allclose(plain.cache.k[1][0], ref.cache.k[1], atol=1e-6)


class _TerseTask(synthetic.SyntheticTask):
  """The suite with other synthesizer and teacher prompts: a second task in one batch."""

  name = "test_terse"

  def synth_prompt(self, problem):
    return f"q: {problem.question}\nout:"

  def text_synthesis_prompt(self, problem, outputs):
    return "".join(f"{b}\n" for b in outputs) + f"q: {problem.question}\nout:"


def test_one_batch_mixes_tasks_each_record_with_its_own_prompts():
  tasks.register(_TerseTask(), replace=True)
  records = _records(4)
  for r in records[1::2]:
    r.update(task="test_terse", synth_prompt="")  # the task's own prompt
  spec = dataclasses.replace(SPEC, teacher_tokens=256)
  host, reasons = _batcher(spec)(records)
  assert not reasons
  for row, r in enumerate(records):
    task = tasks.get(r["task"])
    problem = batching.trace_problem(r)
    prompt = TOK.decode(host.tokens[row][host.mask[row]])
    assert prompt == task.synth_prompt(problem) + r["target"].removesuffix(synthetic.END_MARKER)
    teacher = TOK.decode(host.teacher_tokens[row][host.teacher_mask[row]])
    assert teacher.startswith(task.text_synthesis_prompt(problem, r["branches"]))
  with pytest.raises(ValueError, match="not registered"):
    _batcher()([{**records[0], "task": "evidence"}])


def test_batcher_puts_worker_prompts_before_branches():
  spec = dataclasses.replace(SPEC, worker_prompt_tokens=80)
  examples = synthetic.generate("train", 4, 0, max_workers=SPEC.max_branches)
  records = _records(4, worker_prompts=True)
  host, reasons = _batcher(spec)(records)
  assert not reasons and host.branch_tokens.shape[-1] == 80 + SPEC.branch_tokens
  for row, ex in enumerate(examples):
    for i, branch in enumerate(ex.branches):
      start = host.branch_start[row, i]
      seq = host.branch_tokens[row, i][host.branch_mask[row, i]]
      assert TOK.decode(seq[:start]) == synthetic.worker_prompt_text(ex, i)
      assert TOK.decode(seq[start:]) == " " + branch
  # Records without worker prompts keep branches alone; too long a prompt is skipped.
  host, _ = _batcher(spec)(_records(2))
  assert not host.branch_start.any()
  short = dataclasses.replace(SPEC, worker_prompt_tokens=4)
  _, reasons = _batcher(short)(records[:1])
  assert reasons == {"worker_prompt_too_long": 1}
