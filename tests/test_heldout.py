"""Held-out CE: the teacher's equals a plain forward over the pasted text (a text arm's: with
its LoRA), the naive merge's the inference path's (`synthesis_logits`), an identity adapter
equals the naive merge, tasks are pooled apart and over-budget traces are counted."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from psynth_jax import load_pretrained, tasks, testing
from psynth_jax.mapper import Mapper
from psynth_jax.model.checkpoint import save_converted
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import forward
from psynth_jax.synthesis import synthesis_logits
from psynth_jax.tasks.base import Problem
from psynth_jax.tokenizer import Tokenizer
from psynth_jax.train import batching, data, heldout
from psynth_jax.workers import encode_branches

SPEC = batching.BatchSpec(
  max_branches=3,
  branch_tokens=48,
  branch_rows=120,
  synth_tokens=240,
  target_tokens=64,
  teacher_tokens=400,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("heldout")
  tok_dir = testing.bpe_tokenizer_folder(root / "tok")
  config = testing.tiny_config(
    vocab_size=Tokenizer.from_folder(tok_dir).vocab_size, max_position_embeddings=1024
  )
  save_converted(testing.random_params(config), root / "model", tokenizer_src=tok_dir)
  lm = load_pretrained(str(root / "model"))
  chat, chunks = tasks.get("chat_rounds"), tasks.get("retrieved_chunks")
  traces = []
  for i in range(3):
    rounds = [f"[Round {j + 1}]\nUser: hi {i} {j}\nAssistant: ok {j}" for j in range(2)]
    p = Problem(f"c{i}", f"User: what now {i}?", f"reply number {i}", {"branches": rounds})
    traces.append(data.gold_trace(chat, p))
  for i in range(2):
    paras = [f"[Chunk {j + 1}] text {i} {j}" for j in range(3)]
    p = Problem(
      f"r{i}", f"User: where {i}?", f"Supporting chunk: 2\nthere {i}", {"branches": paras}
    )
    traces.append(data.gold_trace(chunks, p))
  long = Problem("long", "User: x", "y", {"branches": ["word " * 200]})
  traces.append(data.gold_trace(chat, long))  # a branch over SPEC.branch_tokens
  batcher = batching.Batcher(lm.tokenizer, SPEC, lm.pad_id, lm.stop_ids[0])
  return lm, batcher, traces


def _teacher_ce(lm, trace, lora=None):
  """Summed target CE of the base model (+ `lora`) over the text-synthesis prompt + target
  (no batching), and the number of target tokens."""
  task = tasks.get(trace["task"])
  prompt = task.encode(lm.tokenizer, batching.teacher_prompt(trace))
  target = lm.tokenizer.encode(trace["target"]) + [lm.stop_ids[0]]
  tokens = jnp.asarray([prompt + target])
  logits, _ = forward(lm.params, tokens, jnp.arange(tokens.shape[1])[None], lora=lora)
  pred = logits[0, len(prompt) - 1 : len(prompt) + len(target) - 1]
  return float(
    optax.softmax_cross_entropy_with_integer_labels(pred, jnp.asarray(target)).sum()
  ), len(target)


def _synthesizer_ce(lm, trace):
  """The same for the inference path: `synthesis_logits` over `encode_branches` (naive merge)."""
  task = tasks.get(trace["task"])
  branches = encode_branches(lm, [lm.tokenizer.encode(b) for b in trace["branches"]])
  prompt = task.encode(lm.tokenizer, trace["synth_prompt"])
  target = lm.tokenizer.encode(trace["target"]) + [lm.stop_ids[0]]
  logits = synthesis_logits(lm, branches, prompt + target)
  pred = logits[len(prompt) - 1 : len(prompt) + len(target) - 1]
  return float(optax.softmax_cross_entropy_with_integer_labels(pred, jnp.asarray(target)).sum())


def test_heldout_ce_against_plain_references(setup):
  lm, batcher, traces = setup
  fresh = (
    Mapper.create("affine", lm.config.num_layers),
    LoRAWeights.init(lm.config, LoRAConfig(rank=2)),  # B = 0: the base model
  )
  arms = {"naive_merge": (None, None), "fresh": fresh}
  text_lora = jax.tree.map(  # moved off B = 0, so that it changes the text synthesizer
    lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), fresh[1]
  )
  text_arms = {"text_fresh": fresh[1], "text_lora": text_lora}
  result = heldout.evaluate(
    lm.params, batcher, traces, arms, text_arms=text_arms, batch_size=2, progress=False
  )
  assert result["skipped"] == {"branch_too_long": 1}
  by_task = result["tasks"]
  assert {t: r["examples"] for t, r in by_task.items()} == {"chat_rounds": 3, "retrieved_chunks": 2}
  for task, r in by_task.items():
    # An identity mapper and a zero LoRA are the naive merge.
    np.testing.assert_allclose(r["fresh"], r["naive_merge"], rtol=1e-5)
    kept = [t for t in traces if t["task"] == task and t["id"] != "long"]
    sums = [_teacher_ce(lm, t) for t in kept]
    assert r["tokens"] == sum(n for _, n in sums)
    np.testing.assert_allclose(r["text"], sum(s for s, _ in sums) / r["tokens"], rtol=2e-5)
    np.testing.assert_allclose(r["text_fresh"], r["text"], rtol=1e-5)
    with_lora = sum(_teacher_ce(lm, t, text_lora)[0] for t in kept) / r["tokens"]
    np.testing.assert_allclose(r["text_lora"], with_lora, rtol=2e-5)
    assert abs(r["text_lora"] - r["text"]) > 1e-4
    naive = sum(_synthesizer_ce(lm, t) for t in kept) / r["tokens"]
    np.testing.assert_allclose(r["naive_merge"], naive, rtol=2e-5)
    assert np.isfinite(r["naive_merge"]) and r["naive_merge"] > 0
  table = heldout.format_table(result, [*text_arms, *arms])
  assert "| chat_rounds | 3 |" in table and "branch_too_long" in table and "text_lora" in table
  assert "naive_merge - text teacher, all 5 examples" in table
  with pytest.raises(ValueError, match="distinct"):
    heldout.evaluate(lm.params, batcher, traces, arms, text_arms={"fresh": fresh[1]})

  # Per-example records: they sum to the task figures and pair by id.
  records = result["examples"]
  assert sorted(r["id"] for r in records) == sorted(t["id"] for t in traces if t["id"] != "long")
  for task, r in by_task.items():
    mine = [x for x in records if x["task"] == task]
    tokens = sum(x["tokens"] for x in mine)
    for arm in ("text", "naive_merge", "text_lora"):
      np.testing.assert_allclose(sum(x[arm] for x in mine) / tokens, r[arm], rtol=1e-6)
  same = heldout.paired_difference(records, "naive_merge", records, "naive_merge")
  assert same["difference"] == 0 and same["interval"] == [0.0, 0.0]
  gap = heldout.paired_difference(records, "naive_merge", records[::-1], "text", resamples=500)
  tokens = sum(x["tokens"] for x in records)
  want = sum(x["naive_merge"] - x["text"] for x in records) / tokens
  assert gap["examples"] == len(records) and gap["tokens"] == tokens
  np.testing.assert_allclose(gap["difference"], want, rtol=1e-9)
  assert gap["interval"][0] <= gap["difference"] <= gap["interval"][1]
  with pytest.raises(ValueError, match="share no example"):
    heldout.paired_difference(records[:1], "text", records[1:], "text")


def test_heldout_ce_needs_the_teacher(setup):
  lm, batcher, traces = setup
  no_teacher = batching.Batcher(
    lm.tokenizer, batching.BatchSpec(3, 48, 120, 240, 64), lm.pad_id, lm.stop_ids[0]
  )
  with pytest.raises(ValueError, match="teacher_tokens"):
    heldout.evaluate(lm.params, no_teacher, traces, {"naive_merge": (None, None)})
