"""The agent benchmarks' loaders, prompts and scorers on tiny made-up copies of the upstream formats."""

import json
import os
import shutil

import pytest

from psynth_jax import tasks
from psynth_jax.tasks import agents
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.benchmark import MissingDataError

BENCH = os.path.join(os.path.dirname(__file__), "fixtures", "bench")
GAIA_ROOT = os.path.join(BENCH, "gaia")
GAIA_VAL = os.path.join(GAIA_ROOT, "2023", "validation")
MARBLE = os.path.join(BENCH, "marble", "database_main.jsonl")


def test_registry_names_the_instances():
  assert tasks.get("gaia") is agents.GAIA and agents.GAIA.name == "gaia"
  assert tasks.get("marble_db") is agents.MARBLE_DB and agents.MARBLE_DB.name == "marble_db"


# --- GAIA loading ---------------------------------------------------------------------------


def test_gaia_loads_ids_answers_levels_and_files():
  problems = agents.GAIA.load(GAIA_VAL)
  assert [p.id for p in problems] == [f"made-up-000{i}" for i in range(1, 5)]
  assert [p.answer for p in problems] == [
    "1234",
    "apple, banana, cherry",
    "Saint Petersburg",
    "3.5",
  ]
  assert [p.meta["level"] for p in problems] == [1, 2, 3, 1]
  assert [p.family for p in problems] == ["level1", "level2", "level3", "level1"]
  first = problems[0].meta
  assert first["file_name"] == "made-up-0001.csv" and os.path.isabs(first["file_path"])
  assert os.path.isfile(first["file_path"]) and first["file_path"].startswith(
    os.path.abspath(GAIA_VAL)
  )
  assert first["annotator_metadata"]["Number of steps"] == "2"
  assert problems[1].meta["file_path"] == "" and problems[1].meta["file_name"] == ""


def test_gaia_finds_the_split_from_a_file_or_the_download_folder():
  ids = [p.id for p in agents.GAIA.load(GAIA_VAL)]
  assert [p.id for p in agents.GAIA.load(os.path.join(GAIA_VAL, "metadata.jsonl"))] == ids
  assert [p.id for p in agents.GAIA.load(GAIA_ROOT, split="validation")] == ids
  with pytest.raises(ValueError, match="'validation' split, not 'test'"):
    agents.GAIA.load(GAIA_VAL, split="test")
  with pytest.raises(ValueError, match="splits are"):
    agents.GAIA.load(GAIA_ROOT, split="train")


def test_gaia_level_option_and_limit():
  assert [p.id for p in agents.GAIA.load(GAIA_VAL, level=1)] == ["made-up-0001", "made-up-0004"]
  assert [p.id for p in agents.GAIA.load(GAIA_VAL, level=(2, 3))] == [
    "made-up-0002",
    "made-up-0003",
  ]
  assert [p.id for p in agents.GAIA.load(GAIA_VAL, limit=2)] == ["made-up-0001", "made-up-0002"]
  assert [p.id for p in agents.GAIA.load(GAIA_VAL, level=1, limit=1)] == ["made-up-0001"]
  with pytest.raises(ValueError, match="levels are"):
    agents.GAIA.load(GAIA_VAL, level=4)


def test_gaia_without_data_says_where_to_get_it(tmp_path):
  for path in (None, str(tmp_path)):
    with pytest.raises(MissingDataError) as err:
      agents.GAIA.load(path)
    message = str(err.value)
    assert "gaia-benchmark/GAIA" in message and "metadata.jsonl" in message


def test_gaia_missing_attached_file_is_named(tmp_path):
  shutil.copy(os.path.join(GAIA_VAL, "metadata.jsonl"), tmp_path / "metadata.jsonl")
  with pytest.raises(FileNotFoundError, match="made-up-0001.csv") as err:
    agents.GAIA.load(str(tmp_path))
  assert not isinstance(err.value, MissingDataError)  # the data is there, one file is not
  assert [p.id for p in agents.GAIA.load(str(tmp_path), level=2)] == ["made-up-0002"]


def test_gaia_test_split_loads_but_cannot_be_scored():
  problems = agents.GAIA.load(GAIA_ROOT, split="test")
  assert [p.id for p in problems] == ["made-up-test-0001", "made-up-test-0002"]
  assert all(p.answer == "" for p in problems) and problems[1].meta["level"] == 2
  with pytest.raises(ValueError, match="no gold answer"):
    agents.GAIA.score("FINAL ANSWER: 3", problems[0])
  with pytest.raises(NotImplementedError, match="evaluation set"):
    agents.GAIA.target(problems[0])


def test_gaia_reads_the_parquet_metadata_of_newer_snapshots(tmp_path):
  pq = pytest.importorskip("pyarrow.parquet")
  pa = pytest.importorskip("pyarrow")
  with open(os.path.join(GAIA_VAL, "metadata.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "metadata.parquet")
  shutil.copy(os.path.join(GAIA_VAL, "made-up-0001.csv"), tmp_path)
  got, want = agents.GAIA.load(str(tmp_path)), agents.GAIA.load(GAIA_VAL)
  assert [(p.id, p.answer, p.meta["level"]) for p in got] == [
    (p.id, p.answer, p.meta["level"]) for p in want
  ]


def test_gaia_prompts_restate_the_question_and_the_answer_format():
  problem = agents.GAIA.load(GAIA_VAL, limit=1)[0]
  prompts = [
    *agents.GAIA.worker_prompts(problem, 3),
    agents.GAIA.single_agent_prompt(problem),
    agents.GAIA.text_synthesis_prompt(problem, ["a", "b", "c"]),
    agents.GAIA.synth_prompt(problem),
  ]
  for prompt in prompts:
    assert problem.question in prompt and "Attached file: made-up-0001.csv" in prompt
    assert "FINAL ANSWER:" in prompt and "{" not in prompt
  assert len(set(prompts[:3])) == 3 and "[Worker 3]: c" in prompts[4]


# --- GAIA scoring ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "answer, gold, match",
  [
    ("1,234", "1234", True),  # thousands separators
    ("$1234", "1234", True),  # currency sign
    ("12%", "12", True),
    ("3.50", "3.5", True),  # compared as floats
    ("17 km", "17", False),  # other units make it no number
    ("seventeen", "17", False),
    ("apple; banana ,cherry", "apple, banana, cherry", True),  # either separator, spaces
    ("Apple, Banana, Cherry", "apple, banana, cherry", True),  # case
    ("apple, banana", "apple, banana, cherry", False),  # list lengths differ
    ("1, $2, 3%", "1, 2, 3", True),  # numeric elements
    ("St. Louis, Paris", "St Louis, Paris", False),  # list elements keep punctuation
    ("Saint-Petersburg!", "Saint Petersburg", True),  # strings drop punctuation, spaces
    ("sea gull", "Seagull", True),
    ("Saint Petersburg, Russia", "Saint Petersburg", False),
    (None, "None", True),  # a missing answer is the string "None", as upstream
  ],
)
def test_gaia_match_follows_the_official_rules(answer, gold, match):
  assert agents.gaia_match(answer, gold) is match


def test_gaia_score_reads_the_answer_line():
  problem = agents.GAIA.load(GAIA_VAL, limit=1)[0]  # gold 1234
  assert agents.GAIA.score("Adding the column: 1000 + 234.\nFINAL ANSWER: $1,234", problem) == 1.0
  assert agents.GAIA.score("final answer: **1234**\nThat is all.", problem) == 1.0
  assert agents.GAIA.score("FINAL ANSWER:\n\n1234", problem) == 1.0
  assert agents.GAIA.score("FINAL ANSWER: 12\nFINAL ANSWER: 1234", problem) == 1.0  # the last
  assert agents.GAIA.score("So the total is \\boxed{1234}.", problem) == 1.0
  assert agents.GAIA.score("1234", problem) == 1.0  # a bare answer
  assert agents.GAIA.score("The total is 1234 dollars.", problem) == 0.0


# --- MARBLE database diagnosis ----------------------------------------------------------------


def test_marble_loads_ids_answers_and_environment():
  problems = agents.MARBLE_DB.load(MARBLE)
  assert [p.id for p in problems] == ["1", "2", "3"]
  assert [p.answer for p in problems] == [
    "INSERT_LARGE_DATA",
    "LOCK_CONTENTION",  # "lock contention" in the file
    "FETCH_LARGE_DATA,VACUUM",  # sorted
  ]
  assert [p.meta["num_predictions"] for p in problems] == [2, 2, 3]
  assert [p.family for p in problems] == ["single_cause", "single_cause", "multi_cause"]
  third = problems[2]
  assert "example sensor readings" in third.question and "ONLY CHOOSE three" in third.question
  assert third.meta["labels"] == list(agents.MARBLE_LABELS)
  assert [a["anomaly"] for a in third.meta["anomalies"]] == ["VACUUM", "FETCH_LARGE_DATA"]
  assert third.meta["init_sql"].startswith("CREATE TABLE widgets")
  assert third.meta["agents"][0]["agent_id"] == "agent1"
  assert [p.id for p in agents.MARBLE_DB.load(os.path.dirname(MARBLE), limit=2)] == ["1", "2"]


def test_marble_without_data_or_with_the_wrong_file(tmp_path):
  for path in (None, str(tmp_path)):
    with pytest.raises(MissingDataError, match="ulab-uiuc/MARBLE"):
      agents.MARBLE_DB.load(path)
  research = tmp_path / "research_main.jsonl"
  research.write_text(json.dumps({"scenario": "research", "task_id": 1, "task": {}}) + "\n")
  with pytest.raises(ValueError, match="'research' task"):
    agents.MARBLE_DB.load(str(research))
  with pytest.raises(ValueError, match="split must be 'test'"):
    agents.MARBLE_DB.load(MARBLE, split="train")


def test_marble_prompts_ask_for_the_task_number_of_causes():
  problems = agents.MARBLE_DB.load(MARBLE)
  for problem, n in zip(problems, (2, 2, 3), strict=True):
    for prompt in [
      *agents.MARBLE_DB.worker_prompts(problem, 3),
      agents.MARBLE_DB.synth_prompt(problem),
    ]:
      assert problem.question in prompt and f"naming the {n} most likely" in prompt
      assert "ROOT CAUSES:" in prompt and "FETCH_LARGE_DATA" in prompt
  with pytest.raises(NotImplementedError):
    agents.MARBLE_DB.target(problems[0])


def test_marble_score_counts_gold_causes_among_the_allowed_guesses():
  one, _, two = agents.MARBLE_DB.load(MARBLE)
  score = agents.MARBLE_DB.score
  assert score("ROOT CAUSES: INSERT_LARGE_DATA, VACUUM", one) == 1.0
  assert score("ROOT CAUSES: VACUUM, insert large data", one) == 1.0  # second guess, spelling
  assert score("ROOT CAUSES: VACUUM, LOCK_CONTENTION", one) == 0.0
  # Only the allowed number of guesses counts, so naming every label cannot score.
  assert score("ROOT CAUSES: VACUUM, LOCK_CONTENTION, INSERT_LARGE_DATA", one) == 0.0
  assert score("ROOT CAUSES: VACUUM, LOCK_CONTENTION, REDUNDANT_INDEX", two) == 0.5
  assert score("root causes: fetch-large-data, VACUUM, LOCK_CONTENTION", two) == 1.0
  # The answer line, not the discussion before it; else the last \boxed{} or the last line.
  assert (
    score("INSERT_LARGE_DATA looks unlikely.\nROOT CAUSES: VACUUM, REDUNDANT_INDEX", one) == 0.0
  )
  assert score("The causes are \\boxed{INSERT_LARGE_DATA, VACUUM}.", one) == 1.0
  assert score("VACUUM was checked.\nMost likely: INSERT_LARGE_DATA", one) == 1.0
  assert score("", one) == 0.0


def test_marble_score_on_a_hand_built_problem_uses_the_defaults():
  problem = Problem("x", "Why is the database slow?", "LOCK_CONTENTION")
  assert agents.MARBLE_DB.score("ROOT CAUSES: LOCK_CONTENTION", problem) == 1.0
  assert agents.MARBLE_DB.score("ROOT CAUSES: VACUUM, LOCK_CONTENTION", problem) == 0.0  # one guess
  with pytest.raises(ValueError, match="no gold root causes"):
    agents.MARBLE_DB.score("ROOT CAUSES: VACUUM", Problem("y", "q"))
