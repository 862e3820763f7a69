"""Stage-1 routes: upstream formats parsed into branches and targets with skip reasons, the
overlap check removes a planted benchmark question, and a build is deterministic."""

import json

import pytest

from psynth_jax import tasks
from psynth_jax.tasks import benchmark
from psynth_jax.tasks.chat_rounds import ChatRoundsTask
from psynth_jax.train import data, stage1
from psynth_jax.train.overlap import Contamination

PLANTED = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"
BENCHMARKS = {
  "gsm8k": [("gsm8k-0", PLANTED)],
  "mbpp": [("mbpp-1", "Write a function to add two numbers.")],
}


def _conv(n_rounds, prefix="q", style="sharegpt"):
  turns = []
  for i in range(n_rounds):
    turns += [("user", f"{prefix} question {i}"), ("assistant", f"{prefix} answer {i}")]
  if style == "sharegpt":
    names = {"user": "human", "assistant": "gpt"}
    return [{"from": names[r], "value": t} for r, t in turns]
  return [{"role": r, "content": t} for r, t in turns]


@pytest.fixture
def sharegpt_file(tmp_path):
  records = [
    {"id": "a", "conversations": _conv(4)},
    {"id": "b", "conversations": _conv(2)},  # too short
    {"id": "c", "conversations": [{"from": "gpt", "value": "tail of a reply"}] + _conv(3, "c")},
    {"id": "d", "conversations": _conv(3) + [{"from": "human", "value": "no reply yet"}]},
    {"id": "e", "conversations": _conv(3)[:3] + [{"from": "bing", "value": "x"}] + _conv(3)[3:]},
    {"id": "f", "conversations": _conv(12, "f")},
  ]
  text = json.dumps(records, indent=2)
  cut = text[: text.rindex('"id": "f"') + 40]  # cut inside the last record, as upstream
  path = tmp_path / "sharegpt.json"
  path.write_text(cut)
  return path


def test_chat_rounds_reads_a_cut_sharegpt_file(sharegpt_file):
  task = ChatRoundsTask(max_branches=8)
  problems, report = task.load_report(str(sharegpt_file), split="train")
  problems += task.load(str(sharegpt_file), split="validation")
  by_id = {p.id: p for p in problems}
  assert sorted(by_id) == ["a", "c", "d"]
  a = by_id["a"]
  assert a.question == "User: q question 3" and a.answer == "q answer 3"
  assert a.meta["branches"] == [
    f"[Round {i + 1}]\nUser: q question {i}\nAssistant: q answer {i}" for i in range(3)
  ]
  assert by_id["c"].meta["branches"][0].startswith("[Round 1]\nUser: c question 0")
  assert by_id["d"].answer == "q answer 2"  # the unanswered last message is cut
  j = report.to_json()
  assert j["rows"] == 5 and j["skipped"] == {"fewer than 3 rounds": 1, "unknown role 'bing'": 1}
  assert j["notes"]["file cut inside its last record (dropped)"] == 1
  assert j["notes"]["leading assistant turn (a continued part) dropped"] == 1


@pytest.mark.parametrize("key", ["messages", "conversation"])  # UltraChat / WildChat, LMSYS
def test_chat_rounds_reads_other_upstream_shapes(tmp_path, key):
  rows = [
    {"conversation_id": "x1", key: _conv(3, style="roles")},
    {"id": "x2", key: _conv(12, style="roles")},
  ]
  path = tmp_path / "chats.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  task = ChatRoundsTask(max_branches=4)
  problems = task.load(str(path)) + task.load(str(path), split="validation")
  long = next(p for p in problems if p.id == "x2")
  assert len(long.meta["branches"]) == 4 and long.meta["branches"][0].startswith("[Round 8]")
  assert {p.id for p in problems} == {"x1", "x2"}


def test_retrieved_chunks_names_the_gold_chunk(tmp_path):
  docs = {"ssa": [f"paragraph {i}" for i in range(6)]}
  rows = [
    {
      "answers": ["yes"],
      "ground_truth_ctx": 4,
      "document": "ssa",
      "ctxs": [0, 4, 2, 1, 3],
      "messages": [
        {"role": "user", "content": "Q1?"},
        {"role": "assistant", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "Q2?"},
      ],
    },
    {
      "answers": ["no"],
      "ground_truth_ctx": 5,
      "document": "ssa",
      "ctxs": [0, 1, 2, 3, 4],
      "messages": [{"role": "user", "content": "Q?"}],
    },
    {
      "answers": [],
      "ground_truth_ctx": 0,
      "document": "ssa",
      "ctxs": [0, 1, 2, 3, 4],
      "messages": [{"role": "user", "content": "Q?"}],
    },
  ]
  (tmp_path / "nvidia_dragon_multiturn_retrieved.jsonl").write_text(json.dumps(rows))
  (tmp_path / "documents.json").write_text(json.dumps(docs))
  task = tasks.get("retrieved_chunks")
  problems, report = task.load_report(str(tmp_path))
  problems += task.load(str(tmp_path), split="validation")
  assert len(problems) == 1
  p = problems[0]
  assert p.question == "User: Q1?\nAssistant: A B\nUser: Q2?"
  assert p.answer == "Supporting chunk: 2\nyes"
  assert p.meta["branches"][1] == "[Chunk 2] paragraph 4"
  assert report.to_json()["skipped"] == {
    "gold chunk not among the retrieved": 1,
    "no reference answer": 1,
  }


def test_the_overlap_check_removes_a_planted_benchmark_question(sharegpt_file, tmp_path):
  check = Contamination(BENCHMARKS)
  assert check.find("x", ["nothing to see here"]) is None
  assert "gsm8k:gsm8k-0" in check.find("x", [f"Please help. {PLANTED.upper()} Thanks!"])
  assert "same text" in check.find("x", ["write a function to ADD two numbers"])
  assert "same id" in check.find("mbpp-1", ["unrelated"])
  records = json.loads(
    sharegpt_file.read_text()[: sharegpt_file.read_text().rindex(',\n  {\n    "id": "f"')] + "]"
  )
  records[0]["conversations"][1]["value"] = f"Sure: {PLANTED}"  # inside a branch of "a"
  path = tmp_path / "planted.json"
  path.write_text(json.dumps(records))
  cards = stage1.build(
    ["chat_rounds"], str(tmp_path / "out"), paths={"chat_rounds": str(path)}, benchmarks=BENCHMARKS
  )
  assert list(cards[0].removed_by_overlap) == ["chat_rounds:a"]
  rows = data.read_jsonl(tmp_path / "out" / "train.jsonl") + data.read_jsonl(
    tmp_path / "out" / "validation.jsonl"
  )
  assert sorted(r["id"] for r in rows) == ["chat_rounds:c", "chat_rounds:d"]
  assert "removed by the overlap check: 1" in (tmp_path / "out" / "DATA_CARD.md").read_text()


def test_a_build_is_deterministic(sharegpt_file, tmp_path):
  for name in ("one", "two"):
    stage1.build(
      ["chat_rounds"],
      str(tmp_path / name),
      paths={"chat_rounds": str(sharegpt_file)},
      benchmarks=BENCHMARKS,
    )
  for f in ("train.jsonl", "validation.jsonl", "data_card.json"):
    assert (tmp_path / "one" / f).read_text() == (tmp_path / "two" / f).read_text()


def test_the_packaged_sources_have_their_row_counts():
  """The real files (installed by `psynth data install`, always in CI)."""
  try:
    chats, chat_report = tasks.get("chat_rounds").load_report()
    chunks, chunk_report = tasks.get("retrieved_chunks").load_report()
  except benchmark.MissingDataError as e:
    pytest.skip(str(e))
  assert chat_report.rows == 17_671 and len(chats) > 8_000
  assert chunk_report.rows == 3_939 and len(chunks) > 2_500


def test_two_training_steps_on_each_routes_traces(sharegpt_file, tmp_path):
  """The traces are trainer rows: a tiny chat model takes two steps on each route's."""
  import math

  from psynth_jax import testing

  chunks = tmp_path / "chunks"
  chunks.mkdir()
  docs = {"d": [f"paragraph {i} about topic {i}" for i in range(6)]}
  rows = [
    {
      "answers": [f"answer {i}"],
      "ground_truth_ctx": i % 5,
      "document": "d",
      "ctxs": [0, 1, 2, 3, 4],
      "messages": [{"role": "user", "content": f"question {i}?"}],
    }
    for i in range(8)
  ]
  (chunks / "nvidia_dragon_multiturn_retrieved.jsonl").write_text(json.dumps(rows))
  (chunks / "documents.json").write_text(json.dumps(docs))
  paths = {"chat_rounds": str(sharegpt_file), "retrieved_chunks": str(chunks)}
  for route, path in paths.items():
    out = tmp_path / route
    stage1.build([route], str(out), paths={route: path}, benchmarks=BENCHMARKS)
    history = testing.train_two_steps(
      tmp_path / f"work_{route}",
      out / "train.jsonl",
      branch_tokens=128,
      branch_rows=640,
      target_tokens=64,
    )
    losses = [h["loss"] for h in history]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), (route, losses)
    assert all(h["skipped"] == 0 for h in history), (route, history)


def test_problems_of_one_group_share_a_split():
  """Turns of one conversation / document never straddle train and validation."""
  from psynth_jax.tasks.base import Problem
  from psynth_jax.tasks.routes import select

  problems = [
    Problem(f"doc{g}-{t}", "q", "a", {"group": f"doc{g}"}) for g in range(60) for t in range(4)
  ]
  train = {p.id for p in select(problems, "train", None, 0)}
  validation = {p.id for p in select(problems, "validation", None, 0)}
  assert train | validation == {p.id for p in problems} and not train & validation
  for g in range(60):
    ids = {f"doc{g}-{t}" for t in range(4)}
    assert ids <= train or ids <= validation
  assert validation  # 60 groups at 5 %: some land in validation
