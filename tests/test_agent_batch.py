"""Agents of several episodes on one batched cache (`CacheSession(batch=B)`, `run_react_batch`).

* A batched session equals one batch-1 session per conversation: the same greedy outputs,
  first-token logits within float tolerance, the same tokens at the same positions, and the
  same memory branches; conversations may sit turns out, and one stops on a stop id while
  the others run on. Every row a conversation did not write is invalid (its valid rows are
  exactly its written tokens).
* `run_react_batch` runs each agent's loop exactly as `run_react` does; finished agents sit
  the later steps out.
"""

import numpy as np
import pytest

from psynth_jax import testing
from psynth_jax.agents.memory import MEMORY_MODES, memory_branches
from psynth_jax.agents.react import Agent, run_react, run_react_batch
from psynth_jax.agents.session import CacheSession
from psynth_jax.agents.tools import Tool, Toolbox
from psynth_jax.language_model import LanguageModel

CONFIG = testing.tiny_config(max_position_embeddings=512)
NEW, CAPACITY, ATOL = 6, 256, 1e-4
# Per step, each conversation's new ids (None: it sits the step out); lengths cross buckets.
FEEDS = [
  [[5, 9, 2, 40], [7] * 3, list(range(30, 50)) + [1]],
  [[11, 12], None, [3, 4, 5]],
  [list(range(40, 60)), [8, 1], None],
]


@pytest.fixture(scope="module")
def lm():
  """A model with a stop id that conversation 1 emits early in its first output."""
  plain = LanguageModel(testing.random_params(CONFIG), stop_ids=(), pad_id=0)
  probe = CacheSession.text(plain, NEW, CAPACITY).turn(FEEDS[0][1])
  j = next(j for j in range(1, len(probe)) if probe[j] not in probe[:j])
  return LanguageModel(plain.params, stop_ids=(probe[j],), pad_id=0)


def alone(lm, b):
  session = CacheSession.text(lm, NEW, CAPACITY)
  for step in FEEDS:
    if step[b] is not None:
      session.turn(step[b])
  return session


@pytest.fixture(scope="module")
def sessions(lm):
  batched = CacheSession.text(lm, NEW, CAPACITY, batch=3)
  outs = [batched.step(step) for step in FEEDS]
  for step, out in zip(FEEDS, outs, strict=True):
    assert [o is None for o in out] == [f is None for f in step]
  return batched, [alone(lm, b) for b in range(3)]


def test_a_batched_session_equals_one_session_per_conversation(sessions):
  batched, singles = sessions
  assert batched.row(1).turns[0].stopped and not singles[0].turns[0].stopped  # mixed ends
  for b, single in enumerate(singles):
    row = batched.row(b)
    assert [t.output for t in row.turns] == [t.output for t in single.turns]
    assert [t.fed for t in row.turns] == [t.fed for t in single.turns]
    for t, s in zip(row.turns, single.turns, strict=True):
      np.testing.assert_allclose(t.first_logits, s.first_logits, atol=ATOL)
    strip = lambda ws: [(w.id, w.position, w.turn, w.output) for w in ws]  # noqa: E731
    assert strip(row.written) == strip(single.written)


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_batched_rows_give_the_same_memory_branches(sessions, mode):
  batched, singles = sessions
  got = memory_branches([batched.row(b) for b in range(3)], mode)
  want = memory_branches(singles, mode)
  for name in ("lengths", "offsets", "spans", "tokens"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
  np.testing.assert_array_equal(got.cache.positions, want.cache.positions)
  n = np.asarray(want.lengths)
  for layer in range(CONFIG.num_layers):
    for i in range(3):
      for ours, theirs in ((got.cache.k, want.cache.k), (got.cache.v, want.cache.v)):
        np.testing.assert_allclose(
          ours[layer][i, :, : n[i]], theirs[layer][i, :, : n[i]], atol=ATOL
        )


def test_only_a_conversations_own_tokens_are_valid(sessions):
  batched, _ = sessions
  batched.flush()
  valid = np.asarray(batched.cache.valid)
  for b in range(3):
    written = batched.row(b).written
    assert sorted(np.flatnonzero(valid[b])) == sorted(w.row for w in written)
    np.testing.assert_array_equal(
      np.asarray(batched.cache.positions)[b, [w.row for w in written]],
      [w.position for w in written],
    )


def test_bad_steps_are_refused(lm):
  session = CacheSession.text(lm, NEW, CAPACITY, batch=2)
  with pytest.raises(ValueError, match="every conversation takes the first turn"):
    session.step([[1, 2], None])
  with pytest.raises(ValueError, match="2 feeds for a batch of 2|3 feeds"):
    session.step([[1], [2], [3]])
  with pytest.raises(ValueError, match="use row"):
    session.turn([1, 2])
  session.step([[1, 2], [3]])
  with pytest.raises(ValueError, match="no conversation"):
    session.step([None, None])
  with pytest.raises(ValueError, match="at least one new token"):
    session.step([[], [4]])


# --- the loop, scripted ------------------------------------------------------------------


class Tok:
  """Characters as ids: enough for the loop (it only decodes and renders)."""

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


class Chat:
  def prompt(self, messages):
    return [ord(c) for c in messages[-1]["content"]]

  def observations(self, texts):
    return [ord(c) for c in "|".join(texts)]

  def decode(self, ids):
    return Tok().decode(ids)


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
SCRIPTS = [["The answer is 5."], [CALL, CALL, "5"], [CALL, "five"]]
TOOLBOX = Toolbox([Tool("add", "Add two integers.", {"a": int, "b": int}, lambda a, b: a + b)])


class ScriptedBatch:
  """A batched `step` that writes each agent's scripted outputs in order."""

  def __init__(self, scripts):
    self.batch, self.scripts, self.fed = len(scripts), scripts, [[] for _ in scripts]

  def step(self, feeds):
    out = []
    for b, feed in enumerate(feeds):
      if feed is None:
        out.append(None)
        continue
      self.fed[b].append(feed)
      out.append([ord(c) for c in self.scripts[b][len(self.fed[b]) - 1]])
    return out


class ScriptedOne:
  def __init__(self, script):
    self.script, self.fed = script, []

  def turn(self, feed):
    self.fed.append(feed)
    return [ord(c) for c in self.script[len(self.fed) - 1]]


def test_the_batched_loop_runs_each_agent_as_run_react():
  agents = [Agent(Chat(), [{"role": "user", "content": f"task {b}"}], TOOLBOX) for b in range(3)]
  model = ScriptedBatch(SCRIPTS)
  episodes = run_react_batch(model, agents, max_steps=5)
  for b, (agent, episode) in enumerate(zip(agents, episodes, strict=True)):
    one = ScriptedOne(SCRIPTS[b])
    want = run_react(one, agent.chat, agent.messages, agent.toolbox, max_steps=5)
    assert (episode.answer, episode.stopped, episode.outputs) == (
      want.answer,
      want.stopped,
      want.outputs,
    )
    assert [s.observations for s in episode.steps] == [s.observations for s in want.steps]
    assert model.fed[b] == one.fed  # a finished agent was not fed again
  assert [e.num_tool_calls for e in episodes] == [0, 2, 1]
  with pytest.raises(ValueError, match="2 agents for a session of batch 3"):
    run_react_batch(model, agents[:2])


# --- recorded conversations --------------------------------------------------------------


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_a_replayed_conversation_gives_the_live_memory_branches(lm, sessions, mode):
  from psynth_jax.agents.harness import conversation, replay

  batched, singles = sessions
  replayed = [replay(lm, conversation(batched.row(b)), CAPACITY) for b in range(3)]
  strip = lambda ws: [(w.id, w.position, w.turn, w.output) for w in ws]  # noqa: E731
  for r, s in zip(replayed, singles, strict=True):
    s.flush()
    assert strip(r.written) == strip(s.written)
  got, want = memory_branches(replayed, mode), memory_branches(singles, mode)
  for name in ("lengths", "offsets", "spans", "tokens"):
    np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
  n = np.asarray(want.lengths)
  for layer in range(CONFIG.num_layers):
    for i in range(3):
      np.testing.assert_allclose(
        got.cache.k[layer][i, :, : n[i]], want.cache.k[layer][i, :, : n[i]], atol=ATOL
      )
      np.testing.assert_allclose(
        got.cache.v[layer][i, :, : n[i]], want.cache.v[layer][i, :, : n[i]], atol=ATOL
      )
