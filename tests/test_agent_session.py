"""Agents on an explicit cache (`psynth_jax/agents/session.py`, `episode.py`).

* The synthesizer over a persistent latent prefix equals recomputing [merged prefix + the
  conversation so far] from scratch, turn by turn: the logits its first token is drawn
  from, and its greedy tokens (the argmax chain of the recomputation), with a mapper and a
  LoRA, over single-turn and multi-turn branches, with outputs cut by the budget and
  outputs ended by a stop id.
* It never re-prefills the prefix: each turn prefills only its own new ids (counted), the
  prefix rows stay bit for bit what the merge wrote, in the same buffer (donated).
* The text baseline keeps its cache across turns too: later turns prefill only their ids
  and equal the plain forward over the whole conversation.
* A whole episode (worker agents -> memory branches -> synthesizer agent) runs on a tiny
  random chat model on both paths, TTFT being each synthesizer's first step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax import testing
from psynth_jax.agents import episode as agent_episode
from psynth_jax.agents.memory import memory_branches
from psynth_jax.agents.react import Agent
from psynth_jax.agents.session import CacheSession
from psynth_jax.agents.tool_calls import ChatFormat
from psynth_jax.agents.tools import Tool, Toolbox
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.merge import merge
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.synthesis import branch_rows, synthesis_logits
from psynth_jax.tokenizer import Tokenizer
from psynth_jax.workers import encode_branches

CONFIG = testing.tiny_config(max_position_embeddings=512)
TEXTS = [[4, 8, 15, 16, 23], [42, 1, 2, 3, 5, 8, 13, 21, 34, 55, 7, 7], [9, 60, 11]]
# The synthesizer's first prompt, then what follows each of its outputs (tool responses);
# the last crosses a length bucket.
TURNS = [[30, 31, 2, 17, 44, 6], [5, 6, 7, 8, 9], list(range(10, 30))]
NEW = 4
CAPACITY = 128
ATOL = 1e-4


def _replace(state, fn):
  flat = [
    (path, var.replace(jnp.asarray(fn(path, np.asarray(var[...])))))
    for path, var in nnx.to_flat_state(state)
  ]
  return nnx.from_flat_state(flat)


def random_adapters(seed=0):
  """A head_affine mapper and a LoRA far from the identity."""
  rng = np.random.default_rng(seed)
  mapper = Mapper.create("head_affine", CONFIG.num_layers, seed=seed)
  mapper = mapper.replace(state=_replace(mapper.state, lambda p, a: rng.normal(0, 1.0, a.shape)))
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=4, alpha=8.0), seed=seed)
  noisy = lambda p, a: rng.normal(0, 0.3, a.shape) if str(p[0]).startswith("b_") else a  # noqa: E731
  return mapper, lora.replace(state=_replace(lora.state, noisy))


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(testing.random_params(CONFIG), stop_ids=(), pad_id=0)


@pytest.fixture(scope="module")
def branch_sets(lm):
  """Single-turn branches (prefilled texts) and multi-turn ones (two workers' turn outputs)."""
  workers = []
  for inputs in ([[7, 31, 2, 44], [3, 3, 8]], [[60, 3], [12, 13, 14, 15, 16, 17]]):
    session = CacheSession.text(lm, 5, CAPACITY)
    for ids in inputs:
      session.turn(ids)
    workers.append(session)
  return {"single": encode_branches(lm, TEXTS), "multi": memory_branches(workers, "turns")}


def before_output(session, j):
  """The conversation's ids up to the end of turn j's input (what its first token follows)."""
  return [w.id for w in session.written if w.turn < j or (w.turn == j and not w.output)]


def check_against_recomputation(session, logits_of, stop_ids=()):
  """Each turn: first-token logits == recomputed ones; its tokens == their argmax chain."""
  worst = 0.0
  for j, turn in enumerate(session.turns):
    seen = before_output(session, j)
    full = np.asarray(logits_of(seen + turn.output))
    first = len(seen) - 1
    worst = max(worst, float(np.abs(full[first] - np.asarray(turn.first_logits)).max()))
    np.testing.assert_array_equal(full[first : first + len(turn.output)].argmax(-1), turn.output)
    if turn.stopped:
      assert int(full[first + len(turn.output)].argmax()) in stop_ids
  assert worst < ATOL, worst
  return worst


def run_turns(session):
  for ids in TURNS:
    session.turn(ids)
    yield session.cache.k[0].unsafe_buffer_pointer()


@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize("stop", [False, True], ids=["budget", "stop_id"])
def test_the_persistent_prefix_equals_recomputing_it_turn_by_turn(lm, branch_sets, kind, stop):
  branches = branch_sets[kind]
  mapper, lora = random_adapters(1)
  if stop:  # a stop id the first output emits after a few tokens
    probe = CacheSession.latent(lm, branches, mapper, lora, NEW, CAPACITY).turn(TURNS[0])
    lm = LanguageModel(lm.params, stop_ids=(probe[2],), pad_id=0)
  session = CacheSession.latent(lm, branches, mapper, lora, NEW, CAPACITY)
  pointers = list(run_turns(session))
  assert session.turns[0].stopped == stop
  check_against_recomputation(
    session, lambda ids: synthesis_logits(lm, branches, ids, mapper, lora), lm.stop_ids
  )
  # Only the turns' own ids were prefilled: the previous output's unwritten last token (an
  # output cut by the budget) and the new ids; never a merged branch row.
  for j, (ids, turn) in enumerate(zip(TURNS, session.turns, strict=True)):
    before = session.turns[j - 1] if j else None
    pending = [] if before is None or before.stopped else before.output[-1:]
    assert turn.fed == pending + ids
  assert session.prefilled == sum(len(t.fed) for t in session.turns) < sum(map(len, TURNS)) + 3
  # The prefix is what the merge wrote, bit for bit, and it stayed in one buffer.
  rows = branch_rows(branches)
  fresh = jax.jit(merge, static_argnums=(1, 3, 4))(branches, CONFIG, mapper, rows, rows)
  for got, want in zip(session.cache.k + session.cache.v, fresh.k + fresh.v, strict=True):
    np.testing.assert_array_equal(got[:, :, :rows], want)
  np.testing.assert_array_equal(session.cache.positions[:, :rows], fresh.positions)
  np.testing.assert_array_equal(session.cache.valid[:, :rows], fresh.valid)
  assert len(set(pointers)) == 1  # updated in place, never copied
  assert session.turns[0].first_token_s > 0


def test_the_text_baseline_keeps_its_cache_across_turns(lm):
  pasted = [t for text in TEXTS for t in text] + TURNS[0]  # worker outputs pasted, then S
  session = CacheSession.text(lm, NEW, CAPACITY)
  for ids in [pasted, *TURNS[1:]]:
    session.turn(ids)
  check_against_recomputation(session, lambda ids: lm.logits([ids])[0])
  assert [len(t.fed) for t in session.turns] == [len(pasted), 1 + len(TURNS[1]), 1 + len(TURNS[2])]
  assert session.prefilled == len(pasted) + len(TURNS[1]) + len(TURNS[2]) + 2


def test_a_full_session_refuses_more(lm):
  session = CacheSession.text(lm, NEW, capacity=32)
  session.turn(TURNS[0])
  with pytest.raises(ValueError, match="cache is full"):
    session.turn(TURNS[2])
  with pytest.raises(ValueError, match="at least one"):
    CacheSession.text(lm, NEW, CAPACITY).turn([])
  with pytest.raises(ValueError, match="token ids"):
    CacheSession.text(lm, NEW, CAPACITY).turn([CONFIG.vocab_size])
  with pytest.raises(ValueError, match="max_position_embeddings"):
    CacheSession.text(lm, NEW, 1024).turn([1] * (CONFIG.max_position_embeddings - 2))


# --- a whole episode on a tiny chat model ---------------------------------------------


def test_an_episode_runs_workers_and_both_synthesizers(tmp_path):
  tok = Tokenizer.from_folder(testing.bpe_tokenizer_folder(tmp_path / "tok"))
  config = testing.tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=2048)
  chat_lm = LanguageModel(testing.random_params(config), tok, tok.eos_token_ids, tok.pad_token_id)
  toolbox = Toolbox([Tool("add", "Add two integers.", {"a": int, "b": int}, lambda a, b: a + b)])
  chat = ChatFormat(tok, toolbox.schemas())
  question = "What is 2 + 3?"
  workers = [
    Agent(chat, [{"role": "user", "content": f"{question} ({i})"}], toolbox) for i in range(2)
  ]
  budget = dict(max_new_tokens=6, capacity=1536)  # the tool prompt is ~570 tiny-BPE ids
  run = agent_episode.run_workers(chat_lm, [workers, workers[:1]], "turns", **budget)
  assert [r.branches.num_branches for r in run] == [2, 1] and len(run[0].texts) == 2
  assert run[1].texts == run[0].texts[:1]  # the same agent in another episode: same greedy run
  latent_messages = [{"role": "user", "content": f"Latent notes above. {question}"}]
  latent = agent_episode.run_synthesizer(
    chat_lm, Agent(chat, latent_messages, toolbox), run[0].branches, **budget
  )
  pasted_messages = [{"role": "user", "content": "\n".join(run[0].texts) + question}]
  text = agent_episode.run_synthesizer(chat_lm, Agent(chat, pasted_messages, toolbox), **budget)
  for r in (latent, text):
    assert r.ttft_s == r.session.turns[0].first_token_s > 0
    assert r.episode.stopped in ("answer", "step_limit")
    assert len(r.session.turns) == len(r.episode.outputs)
  # The latent synthesizer's first prompt is its own text only (the branches are merged, not
  # prefilled); the baseline's holds the pasted worker outputs.
  assert latent.session.turns[0].fed == chat.prompt(latent_messages)
  assert text.session.turns[0].fed == chat.prompt(pasted_messages)


def test_banned_ids_are_never_sampled_and_change_nothing_else(lm):
  """A turn with banned ids: greedy picks the best allowed id at every step, i.e. the
  argmax of the recomputed logits with those ids at -inf; other rows and turns unbanned."""
  free = CacheSession.text(lm, NEW, CAPACITY)
  first = free.turn(TURNS[0])
  banned = (first[0], first[1])
  session = CacheSession.text(lm, NEW, CAPACITY)
  out = session.turn(TURNS[0], banned)
  assert not set(out) & set(banned) and len(out) == NEW
  ids = list(TURNS[0])
  for token in out:
    logits = np.asarray(lm.logits([ids])[0][-1], np.float64)
    logits[list(banned)] = -np.inf
    assert token == int(np.argmax(logits))
    ids.append(token)
  # The next turn is unbanned again: it equals a session that was fed the same tokens.
  again = session.turn(TURNS[1])
  replay = CacheSession.text(lm, NEW, CAPACITY)
  replay.turn(TURNS[0], banned)
  assert replay.turn(TURNS[1]) == again
  with pytest.raises(ValueError, match="outside the vocabulary"):
    CacheSession.text(lm, NEW, CAPACITY).turn(TURNS[0], [CONFIG.vocab_size])
