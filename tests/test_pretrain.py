"""Pretraining: completion-only loss, length-bucketed batches, the trainer's optimizer,
and a loss that goes down."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from psynth_jax.configs.synthetic import get_config
from psynth_jax.model.transformer import forward, init_params
from psynth_jax.tasks import synthetic
from psynth_jax.tasks import synthetic_pretrain as pretrain
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.train import step as step_lib


def _config(**overrides) -> pretrain.PretrainConfig:
  """The config file's pretraining block with test-sized overrides."""
  return pretrain.PretrainConfig.from_dict({**get_config().pretrain.to_dict(), **overrides})


TINY = _config(
  hidden_size=32,
  num_layers=2,
  num_heads=2,
  intermediate_size=64,
  steps=30,
  batch_tokens=1024,
  buckets=(128, 256, 576),
  learning_rate=1e-2,
  warmup_steps=2,
)


def _batch(n=4, seed=0):
  tok = SuiteTokenizer()
  examples = synthetic.generate("train", n, seed=seed)
  seqs = pretrain.training_sequences(examples, tok, TINY, np.random.default_rng(seed))
  return seqs, pretrain.batches(seqs, TINY.buckets, TINY.batch_tokens, np.random.default_rng(0))


def test_batches_mark_completion_tokens_only():
  seqs, stream = _batch(6)
  seen = 0
  for _ in range(len(seqs)):
    tokens, loss_mask = next(stream)
    assert tokens.shape[0] * tokens.shape[1] <= TINY.batch_tokens
    assert tokens.shape[1] in TINY.buckets
    for row, mask in zip(tokens, loss_mask, strict=True):
      n = int((row != 0).sum())
      if n == 0:
        assert not mask.any()  # filler rows carry no loss
        continue
      match = [m for s, m in seqs if len(s) == n and (s == row[:n]).all()]
      assert match, "every row is one whole training sequence"
      want = np.zeros_like(mask)
      want[:n] = match[0]
      np.testing.assert_array_equal(mask, want)
      # Every completion (a run of masked tokens) ends with <eos>.
      ends = np.flatnonzero(mask[:n] & ~np.append(mask[1:n], False))
      assert (row[ends] == SuiteTokenizer.eos_token_id).all() and ends[-1] == n - 1
      seen += 1
  assert seen >= len(seqs)


def test_formats_in_the_mix():
  tok = SuiteTokenizer()
  ex = synthetic.generate("train", 1, seed=0)[0]
  config = _config(worker_rate=3.0, single_rate=1.0)
  seqs = pretrain.training_sequences([ex], tok, config, np.random.default_rng(1))
  texts = [tok.decode(s, skip_special_tokens=False) for s, _ in seqs]
  first = synthetic.text_synthesis_prompt_text(ex) + synthetic.target_text(ex)
  assert texts[0].startswith(first)
  # Follow-up questions on the same branches, each answered as the suite answers it.
  follow = texts[0][len(first) :]
  want = synthetic.follow_up_questions(ex)
  assert follow.count("\nq: ") == min(len(want), config.follow_ups) > 0
  for turn in follow.split("\nq: ")[1:]:
    question, answer = turn.split("\na:")
    match = [q for q in want if q[0] == question]
    working = f"{match[0][1]} => " if match[0][1] else ""
    assert match and answer == " " + working + match[0][2] + "<eos>"
  assert any(t.startswith(f"q: {ex.question}\n") and "out:" in t for t in texts)
  assert texts[-1] == synthetic.single_agent_prompt_text(ex) + synthetic.target_text(ex)
  for s, mask in seqs:
    starts = np.flatnonzero(mask & ~np.insert(mask[:-1], 0, False))
    for start in starts:  # every completion follows a prompt that ends its turn
      assert tok.decode(s[:start], skip_special_tokens=False).endswith(("a:", "out:"))


def test_loss_counts_completion_targets_only():
  _, stream = _batch()
  tokens, loss_mask = next(stream)
  params = init_params(TINY.model_config(), 0)
  loss_fn = jax.jit(pretrain.completion_loss)
  loss, completion_nll = loss_fn(params, tokens, loss_mask)
  # The same loss by hand: every position's cross-entropy, kept where its target
  # is a completion token.
  b, t = tokens.shape
  positions = np.broadcast_to(np.arange(t - 1), (b, t - 1))
  logits, _ = jax.jit(forward)(params, tokens[:, :-1], positions, None, tokens[:, :-1] != 0)
  nll = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))
  weights = loss_mask[:, 1:]
  assert weights.sum() > 0
  # prompt_weight defaults to 0: the loss is the completion tokens' mean alone.
  np.testing.assert_allclose(loss, nll[weights].mean(), rtol=1e-5)
  np.testing.assert_allclose(completion_nll, nll[weights].mean(), rtol=1e-5)
  # A batch without completion tokens has zero loss, not NaN.
  assert float(loss_fn(params, tokens, np.zeros_like(loss_mask))[0]) == 0.0


def test_a_few_steps_reduce_the_loss():
  _, stream = _batch(8)
  tokens, loss_mask = next(stream)
  params = init_params(TINY.model_config(), 0)
  optimizer_config = TINY.optimizer_config()
  opt_state = step_lib.make_optimizer(optimizer_config, trainable=None).tx.init(params)
  loss_fn = jax.jit(pretrain.completion_loss)
  first = float(loss_fn(params, tokens, loss_mask)[0])
  for _ in range(15):
    params, opt_state, loss = pretrain.train_step(
      params, opt_state, tokens, loss_mask, optimizer_config
    )
  last = float(loss_fn(params, tokens, loss_mask)[0])
  assert np.isfinite(last) and last < 0.7 * first
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params.state))


def _reference_optimizer(config: pretrain.PretrainConfig) -> optax.GradientTransformation:
  """The optimizer pretraining built itself before it used the trainer's builder."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    config.learning_rate,
    config.warmup_steps,
    max(config.steps, config.warmup_steps + 1),  # total steps, warmup included
    config.learning_rate * config.final_lr_fraction,
  )
  return optax.chain(
    optax.clip_by_global_norm(config.grad_clip),
    optax.adamw(
      schedule,
      b1=0.9,
      b2=0.98,
      weight_decay=config.weight_decay,
      mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
    ),
  )


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_trainer_optimizer_matches_the_old_pretraining_chain(warmup_steps):
  # A short run, so the cosine reaches its end; large gradients, so clipping acts.
  config = _config(steps=8, warmup_steps=warmup_steps, grad_clip=0.5, weight_decay=0.1)
  optimizer = step_lib.make_optimizer(config.optimizer_config(), trainable=None)
  reference = _reference_optimizer(config)
  keys = jax.random.split(jax.random.key(0), 3)
  params = {  # matrices decay, vectors (norm scales) do not
    "w": jax.random.normal(keys[0], (6, 5)),
    "norm": jnp.ones((5,)),
    "emb": jax.random.normal(keys[1], (3, 2, 4)),
  }
  ours, theirs = params, params
  state, ref_state = optimizer.tx.init(params), reference.init(params)
  update, ref_update = jax.jit(optimizer.tx.update), jax.jit(reference.update)
  for i in range(10):  # past `steps`: the schedule holds its end value
    k = jax.random.fold_in(keys[2], i)
    grads = jax.tree.map(lambda x, k=k: 3.0 * jax.random.normal(k, x.shape), params)
    updates, state = update(grads, state, ours)
    ref_updates, ref_state = ref_update(grads, ref_state, theirs)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    ours, theirs = optax.apply_updates(ours, updates), optax.apply_updates(theirs, ref_updates)
  end = config.learning_rate * config.final_lr_fraction
  want = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup_steps, 8, end)
  for i in range(10):
    np.testing.assert_allclose(optimizer.schedule(i), want(i), rtol=1e-6)


def test_config_file_spells_out_every_field():
  block = get_config().pretrain.to_dict()
  assert set(block) == {f.name for f in dataclasses.fields(pretrain.PretrainConfig)}


def test_config_from_dict_takes_lists_and_rejects_unknown_or_missing_fields():
  config = _config(buckets=[64, 128], steps=7)
  assert config.buckets == (64, 128) and config.steps == 7
  assert config == dataclasses.replace(_config(), buckets=(64, 128), steps=7)
  with pytest.raises(ValueError, match="stepz"):
    _config(stepz=7)
  values = get_config().pretrain.to_dict()
  del values["steps"], values["seed"]
  with pytest.raises(ValueError, match=r"missing PretrainConfig fields \['seed', 'steps'\]"):
    pretrain.PretrainConfig.from_dict(values)


def test_pretrain_records_an_evaluation_at_every_eval_step():
  config = _config(
    hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, steps=3, copy_steps=1,
    short_steps=0, batch_tokens=576, buckets=(576,), train_examples=6, eval_every=1,
    eval_examples=2, max_new_tokens=2,
  )  # fmt: skip
  _, history = pretrain.pretrain(config, progress=False, log=lambda _: None)
  assert [h["step"] for h in history] == [1, 2, 3]
  assert all(0 <= h["text"]["overall"] <= 1 and 0 <= h["worker"]["exact"] <= 1 for h in history)


def test_every_seed_is_scored_on_the_same_validation_examples(monkeypatch):
  seen = []

  def evaluate(lm, examples, *args, **kwargs):
    seen.append([ex.id for ex in examples])
    return {"text": {"overall": 0.0}, "worker": {"exact": 0.0}}

  monkeypatch.setattr(pretrain, "evaluate", evaluate)
  config = _config(
    hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, steps=1, copy_steps=0,
    short_steps=0, batch_tokens=576, buckets=(576,), train_examples=6, eval_every=1,
    eval_examples=3, max_new_tokens=2,
  )  # fmt: skip
  for seed in (0, 3):
    pretrain.pretrain(dataclasses.replace(config, seed=seed), progress=False, log=lambda _: None)
  expected = [ex.id for ex in synthetic.generate("validation", 3, pretrain.EVAL_SEED)]
  assert seen == [expected, expected]
