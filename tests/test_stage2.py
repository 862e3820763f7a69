"""Stage 2: training problems in no evaluation set, and the text synthesizer's answers as traces."""

import json

import pytest

from psynth_jax import load_pretrained, tasks, testing
from psynth_jax.eval import harness
from psynth_jax.model.checkpoint import save_converted
from psynth_jax.tasks import benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tokenizer import Tokenizer
from psynth_jax.train import batching, data, stage2
from psynth_jax.train.overlap import Contamination

PLANTED = "A robot walks 3 km north and 4 km east each day of a week; how far is it from its start on Sunday evening?"


def _load(name, **kw):
  try:
    return tasks.get(name).load(**kw)
  except benchmark.MissingDataError as e:
    pytest.skip(str(e))


def test_math_train_is_the_math_test_set_without_math500():
  train, validation = _load("math_train"), _load("math_train", split="validation")
  assert len(train) + len(validation) == 4500
  assert not {p.id for p in train} & {p.id for p in validation}
  held_out = {" ".join(p.question.split()) for p in tasks.get("math500").load()}
  assert not held_out & {" ".join(p.question.split()) for p in train + validation}
  assert {p.meta["family"] for p in train} >= {"Algebra", "Geometry", "Precalculus"}


def test_mmlu_train_is_dev_and_validation():
  problems = _load("mmlu_train") + _load("mmlu_train", split="validation")
  assert len(problems) == 285 + 1531
  assert {p.id.split("/")[1] for p in problems} == {"dev", "validation"}
  assert all(p.answer in "ABCD" and len(p.meta["options"]) == 4 for p in problems)


def test_arith_gym_is_seeded_scored_and_split():
  pytest.importorskip("reasoning_gym")
  task = tasks.get("arith_gym")
  train = task.load(limit=60, seed=3)
  assert [p.question for p in train] == [p.question for p in task.load(limit=60, seed=3)]
  validation = task.load(split="validation", limit=60, seed=3)
  assert not {p.question for p in train} & {p.question for p in validation}
  assert len({p.meta["family"] for p in train}) >= 8
  # The gold, boxed, scores 1 under the benchmark scorer; a wrong number scores 0.
  assert all(task.score(f"so \\boxed{{{p.answer}}}", p) == 1.0 for p in train)
  assert task.score("\\boxed{123456789.5}", train[0]) == 0.0
  with pytest.raises(ValueError, match="reads no file"):
    task.load("some.jsonl")


def _records(problems, answers, truncated=(), empty=()):
  rows = []
  for p, answer in zip(problems, answers, strict=True):
    outputs = ["" if p.id in empty else f"worker {i} on {p.id}" for i in range(2)]
    rows.append(
      {
        "kind": "workers",
        "id": p.id,
        "prompts": [f"prompt {i} of {p.id}" for i in range(2)],
        "outputs": outputs,
        "output_ids": [[1], [2]],
        "truncated": [False, p.id == "p2"],
        "seconds": 0.0,
      }
    )
    rows.append(
      {
        "kind": "mode",
        "id": p.id,
        "mode": "text_synthesis",
        "prediction": answer,
        "output_tokens": 5,
        "truncated": p.id in truncated,
        "score": 0.0,
        "ttft_s": None,
      }
    )
  return rows


def test_distil_keeps_the_text_answers_with_their_worker_prompts():
  task = tasks.get("math_train")
  problems = [Problem(f"p{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(6)]
  problems[5] = Problem("p5", PLANTED, "35")
  answers = ["\\boxed{0}", "\\boxed{2}", "\\boxed{5}", "\\boxed{6}", "\\boxed{8}", "\\boxed{35}"]
  rows = _records(problems, answers, truncated={"p3"}, empty={"p4"})
  check = Contamination({"gsm8k": [("gsm8k-9", PLANTED)]})
  traces, report, removed = stage2.distil(task, problems, rows, check=check)
  assert [t["id"] for t in traces] == ["math_train:p0", "math_train:p1", "math_train:p2"]
  assert removed == {"math_train:p5": "gsm8k:gsm8k-9 (same text)"}
  t = traces[1]
  assert t["target"] == "\\boxed{2}" and t["branches"] == ["worker 0 on p1", "worker 1 on p1"]
  assert t["worker_prompts"] == ["prompt 0 of p1", "prompt 1 of p1"]
  assert t["synth_prompt"] == task.synth_prompt(problems[1]) and t["task"] == "math_train"
  j = report.to_json()
  assert j["skipped"] == {
    "text-synthesis answer cut at the token budget": 1,
    "a worker output is empty": 1,
  }
  assert j["notes"]["text-synthesis answer scored 0"] == 1  # p2: 5 is not 4
  assert j["notes"]["a worker output cut at the token budget (kept)"] == 1
  kept, report, _ = stage2.distil(task, problems, rows, only_correct=True, check=check)
  assert [t["id"] for t in kept] == ["math_train:p0", "math_train:p1"]
  assert report.to_json()["skipped"]["text-synthesis answer not correct (only_correct)"] == 1
  # The teacher prompt rebuilt from a trace is the text synthesizer's own, options and all.
  mmlu = tasks.get("mmlu_train")
  choice = Problem("c1", "Which is a prime?", "B", {"options": ["4", "5", "6", "8"]})
  (trace,), _, _ = stage2.distil(mmlu, [choice], _records([choice], ["\\boxed{B}"]))
  outputs = ["worker 0 on c1", "worker 1 on c1"]
  assert batching.teacher_prompt(trace) == mmlu.text_synthesis_prompt(choice, outputs)
  assert "B. 5" in trace["synth_prompt"] and "B. 5" in trace["question"]
  with pytest.raises(ValueError, match="no recorded workers"):
    stage2.distil(task, problems, rows[:-1])


def test_build_runs_the_harness_resumes_and_writes_a_card(tmp_path):
  """End to end on a tiny random chat model: workers and text answers are recorded per
  problem, a second build records nothing new, the card counts every problem."""
  pytest.importorskip("reasoning_gym")
  tok_dir = testing.bpe_tokenizer_folder(tmp_path / "tok")
  config = testing.tiny_config(
    vocab_size=Tokenizer.from_folder(tok_dir).vocab_size, max_position_embeddings=1024
  )
  save_converted(testing.random_params(config), tmp_path / "model", tokenizer_src=tok_dir)
  lm = load_pretrained(str(tmp_path / "model"))
  settings = harness.Settings(num_workers=2, worker_tokens=3, answer_tokens=2)
  out = tmp_path / "out"
  kw = dict(limit=3, settings=settings, benchmarks={"gsm8k": [("g", PLANTED)]}, batch_problems=3)
  cards = stage2.build(lm, ["arith_gym"], str(out), **kw)
  records = out / "runs" / "arith_gym-train" / harness.RECORDS
  rows = harness.read_records(str(records))
  assert [r["kind"] for r in rows].count("workers") == 3
  assert [r.get("mode") for r in rows].count("text_synthesis") == 3
  before = records.read_text()
  stage2.build(lm, ["arith_gym"], str(out), **kw)
  assert records.read_text() == before  # resumed: nothing ran again
  card = json.loads((out / "data_card.json").read_text())
  (route,) = card["routes"]
  assert route["report"]["rows"] == 3 + 1 and card["only_correct"] is False
  skipped = sum(route["report"]["skipped"].values())
  assert skipped + cards[0].train + cards[0].validation == 4
  assert len(data.read_jsonl(out / "train.jsonl")) == cards[0].train
