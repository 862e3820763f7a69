"""The agent benchmark (`psynth_jax/agents/harness.py`, `psynth agents`) on a tiny random chat
model: every mode is recorded for every episode, a re-run runs nothing, a new adapter mode
on a re-run runs alone over the workers' replayed conversations, the summary counts what
was recorded; a database episode runs on a real PostgreSQL (CI runs it, never skips).
"""

import json
import os

import pytest

from psynth_jax import load_pretrained, tasks, testing
from psynth_jax.agents import harness as agent_harness
from psynth_jax.agents import postgres
from psynth_jax.eval import harness, workflow
from psynth_jax.mapper import Mapper

SETTINGS = agent_harness.AgentSettings(
  num_workers=2, max_steps=1, worker_tokens=4, answer_tokens=4, capacity=4096
)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  folder = testing.tiny_chat_model(tmp_path_factory.mktemp("chat"), max_position_embeddings=8192)
  return load_pretrained(str(folder))


def _counts(rows):
  workers, modes = harness.by_problem(rows)
  return len(workers), {pid: sorted(m) for pid, m in modes.items()}


def test_gaia_style_episodes_record_every_mode_and_resume(lm, tmp_path):
  task = tasks.get("gaia_offline")
  problems = task.load(limit=2)
  rows = agent_harness.evaluate_agents(
    lm, task, problems, str(tmp_path), settings=SETTINGS, batch_episodes=2, progress=False
  )
  names = sorted(["single_agent", "text_synthesis", "naive_merge"])
  assert _counts(rows) == (2, {p.id: names for p in problems})
  workers, modes = harness.by_problem(rows)
  for p in problems:
    w = workers[p.id]
    assert len(w["conversations"]) == 2 and len(w["texts"]) == 2
    assert all(turn["input"] for conv in w["conversations"] for turn in conv)
    for name in ("text_synthesis", "naive_merge"):
      assert modes[p.id][name]["ttft_s"] > 0  # one episode at a time: measured
      assert modes[p.id][name]["score"] in (0.0, 1.0)
    assert modes[p.id]["single_agent"]["ttft_s"] is None  # batched
  # Nothing new on a re-run; a new adapter runs alone over replayed conversations.
  again = agent_harness.evaluate_agents(
    lm, task, problems, str(tmp_path), settings=SETTINGS, progress=False
  )
  assert len(again) == len(rows)
  mapper = Mapper.create("head_affine", lm.config.num_layers, seed=1)
  more = agent_harness.evaluate_agents(
    lm,
    task,
    problems,
    str(tmp_path),
    modes=[workflow.CacheMode(workflow.NAIVE_MERGE), workflow.CacheMode("mapped", mapper=mapper)],
    settings=SETTINGS,
    adapters={"mapped": "in-memory"},
    progress=False,
  )
  assert len(more) == len(rows) + 2
  assert [r["mode"] for r in more[len(rows) :]] == ["mapped", "mapped"]
  summary = agent_harness.summarize_agents(more, problems)
  assert summary["num_problems"] == 2 and set(summary["modes"]) == {*names, "mapped"}
  text = agent_harness.format_agent_summary(task.name, summary)
  assert "tool calls" in text and "naive_merge" in text
  # Another setting is refused (its records would not compare).
  with pytest.raises(ValueError, match="settings"):
    agent_harness.evaluate_agents(
      lm, task, problems, str(tmp_path), settings=agent_harness.AgentSettings(), progress=False
    )


def test_a_database_episode_runs_on_postgres(lm, tmp_path):
  if why := postgres.available():
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI must run the PostgreSQL tests: {why}")
    pytest.skip(why)
  task = tasks.get("marble_db_offline")
  problems = task.load(limit=1)
  rows = agent_harness.evaluate_agents(
    lm, task, problems, str(tmp_path), settings=SETTINGS, single_agent=False, progress=False
  )
  workers, modes = harness.by_problem(rows)
  assert len(workers[problems[0].id]["conversations"]) == 5  # one per expert
  assert sorted(modes[problems[0].id]) == ["naive_merge", "text_synthesis"]
  for row in modes[problems[0].id].values():
    assert 0.0 <= row["partial"] <= 1.0 and row["score"] in (0.0, 1.0)
  json.dumps(rows)  # records are plain JSON


def test_unknown_memory_modes_and_non_agent_tasks_are_refused(lm, tmp_path):
  with pytest.raises(ValueError, match="memory must be one of"):
    agent_harness.AgentSettings(memory="everything")
  task = tasks.get("gsm8k")
  from psynth_jax.agents.environments import environment_for

  with pytest.raises(ValueError, match="no agent task"):
    environment_for(task)
