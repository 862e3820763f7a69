"""The benchmark harness behind `psynth eval`: resumable per-problem records and a summary.

For each problem of a task the K workers run once (greedy, the base model);
then every mode answers from those same outputs: single agent, text synthesis,
the naive merge and each given adapter (`workflow.CacheMode`). Problems are
batched (`batch_problems`): their workers and each mode's answers run in one
program each, which equals the one-problem path for greedy decoding. Everything is
appended to `WORKDIR/records.jsonl` as it finishes, one line per event:

  {"kind": "workers", "id", "prompts", "outputs", "output_ids", "truncated", "seconds"}
  {"kind": "mode", "id", "mode", "prediction", "output_tokens", "truncated", "score", "ttft_s"}

so a killed run loses at most the problem in flight, a re-run skips what is
recorded, and a later run with new adapters reuses the recorded worker outputs
(their caches rebuilt by prefill, `workers.worker_branches`) and runs only the
new modes. `WORKDIR/run.json` records the task, the model's fingerprint and the
settings; a re-run with another model or other budgets is refused, since its
records would not be comparable. `summarize` turns records into accuracy per
mode with 95 % intervals, truncation rates, median TTFT and exact McNemar
tests against text synthesis; `rescore` recomputes scores without the model.

`truncated` means the output used its whole token budget (it may be cut short):
a high rate says the budget, not the method, limits the score.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

from psynth_jax.eval import stats, workflow
from psynth_jax.synthesis_batch import synthesize_batch, synthesize_text_batch
from psynth_jax.tasks import Problem, Task
from psynth_jax.workers import run_workers_batch, worker_branches

RECORDS = "records.jsonl"
RUN = "run.json"


@dataclasses.dataclass(frozen=True)
class Settings:
  """What makes two runs' records comparable (recorded in run.json)."""

  num_workers: int = 3  # K (problems with gold branches use their own count)
  worker_tokens: int = 512  # budget per worker output (paper: 4096)
  answer_tokens: int = 512  # budget per synthesizer answer (paper: 4096)


# ---------------------------------------------------------------- records
def read_records(path: str) -> list[dict[str, Any]]:
  """Every complete line of a records file; a half-written last line (a kill) is cut off."""
  if not os.path.exists(path):
    return []
  rows, good = [], 0
  with open(path, "rb") as f:
    for line in f:
      if not line.endswith(b"\n"):
        break
      try:
        rows.append(json.loads(line))
      except (json.JSONDecodeError, UnicodeDecodeError):
        break
      good += len(line)
  with open(path, "r+b") as f:
    f.truncate(good)
  return rows


def append_record(path: str, row: dict[str, Any]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def by_problem(rows: Iterable[dict[str, Any]]) -> tuple[dict[str, dict], dict[str, dict]]:
  """(id -> workers row, id -> {mode -> mode row}); a later row wins."""
  workers, modes = {}, {}
  for row in rows:
    if row["kind"] == "workers":
      workers[row["id"]] = row
    else:
      modes.setdefault(row["id"], {})[row["mode"]] = row
  return workers, modes


def check_run(workdir: str, info: dict[str, Any]) -> None:
  """Writes run.json, or checks that the recorded run is this one."""
  path = os.path.join(workdir, RUN)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
    for key in ("task", "fingerprint", "settings"):
      if recorded.get(key) != info[key]:
        raise ValueError(
          f"{workdir} holds a run with another {key} ({recorded.get(key)!r}, now"
          f" {info[key]!r}); its records are not comparable: use a new --workdir"
        )
    adapters = {**info["adapters"], **recorded.get("adapters", {})}
    for name, folder in info["adapters"].items():
      if recorded.get("adapters", {}).get(name, folder) != folder:
        raise ValueError(
          f"mode {name!r} was recorded from {recorded['adapters'][name]}, not {folder}"
        )
    info = {**recorded, "adapters": adapters}
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, path)


def select(problems: Sequence[Problem], limit: int, seed: int = -1) -> list[Problem]:
  """`limit` problems (0: all): the first ones (seed < 0), or a fixed-seed subset kept
  in upstream order, the same for every run with that seed."""
  if not limit or limit >= len(problems):
    return list(problems)
  if seed < 0:
    return list(problems[:limit])
  import random

  return [problems[i] for i in sorted(random.Random(seed).sample(range(len(problems)), limit))]


# ---------------------------------------------------------------- running
def evaluate(
  lm,
  task: Task,
  problems: Sequence[Problem],
  workdir: str,
  modes: Sequence[workflow.CacheMode] = (workflow.CacheMode(workflow.NAIVE_MERGE),),
  settings: Settings = Settings(),
  single_agent: bool = True,
  text: bool = True,
  adapters: dict[str, str] | None = None,
  progress: bool = True,
  batch_problems: int = 4,
) -> list[dict[str, Any]]:
  """Runs what is not yet recorded for every problem; returns all records of the workdir.

  Problems go `batch_problems` at a time: their workers in one program
  (`run_workers_batch`), then each mode in one (`synthesize_text_batch`,
  `synthesize_batch`). Batched answers carry no TTFT.

  Args:
    lm: the base `LanguageModel` (with a tokenizer).
    task: the problems' task.
    problems: the problems, in order.
    workdir: records.jsonl and run.json live here.
    modes: the cache modes (`workflow.cache_modes`, with adapters from
      `psynth_jax.convert.release.load_adapter`).
    settings: worker count and token budgets.
    single_agent, text: also run those baselines.
    adapters: mode name -> folder, recorded in run.json (a name is bound to one folder).
    progress: a tqdm bar with ETA.
    batch_problems: problems per batched program (1: the one-problem path, with TTFTs).
  """
  from tqdm.auto import tqdm

  info = {
    "task": task.name,
    "fingerprint": lm.params.fingerprint,
    "settings": dataclasses.asdict(settings),
    "adapters": dict(adapters or {}),
  }
  check_run(workdir, info)
  path = os.path.join(workdir, RECORDS)
  workers, done = by_problem(read_records(path))
  wanted = workflow.wanted_modes(modes, single_agent, text)
  bar = tqdm(total=len(problems), desc=task.name, disable=not progress, mininterval=2)
  for start in range(0, len(problems), batch_problems):
    chunk = problems[start : start + batch_problems]
    todo = {
      p.id: [m for m in wanted if workflow.mode_name(m) not in done.get(p.id, {})] for p in chunk
    }
    chunk = [p for p in chunk if todo[p.id]]
    t0 = time.perf_counter()
    fresh = _chunk_workers(lm, task, [p for p in chunk if p.id not in workers], settings, path)
    if fresh and progress:
      bar.write(f"  workers of {len(fresh)} problems: {time.perf_counter() - t0:.0f} s")
    workers.update({pid: row for pid, (row, _) in fresh.items()})
    caches = {}
    for mode in wanted:
      who = [p for p in chunk if mode in todo[p.id]]
      if isinstance(mode, workflow.CacheMode):
        for p in who:
          if p.id not in caches:
            caches[p.id] = (
              fresh[p.id][1] if p.id in fresh else recorded_branches(lm, task, workers[p.id])
            )
      t0 = time.perf_counter()
      results = _answers(lm, task, mode, who, workers, caches, settings, batch_problems)
      if who and progress:
        bar.write(f"  {workflow.mode_name(mode)} of {len(who)}: {time.perf_counter() - t0:.0f} s")
      for p, result in zip(who, results, strict=True):
        _record_mode(path, done, task, p, mode, result, settings)
    bar.update(len(problems[start : start + batch_problems]))
  bar.close()
  return read_records(path)


def _chunk_workers(lm, task, problems, settings, path) -> dict[str, tuple[dict, Any]]:
  """Runs and records the workers of `problems` in one batch: id -> (row, Branches)."""
  if not problems:
    return {}
  tok = lm.require_tokenizer()
  prompts = [
    task.worker_prompts(p, workflow.num_workers(p, settings.num_workers)) for p in problems
  ]
  ids = [[task.encode(tok, text) for text in texts] for texts in prompts]
  outs = run_workers_batch(lm, ids, settings.worker_tokens)
  result = {}
  for p, texts, out in zip(problems, prompts, outs, strict=True):
    row = {
      "kind": "workers",
      "id": p.id,
      "prompts": texts,
      "outputs": [task.branch_from_output(t) for t in out.texts],
      "output_ids": out.tokens,
      "truncated": [len(t) >= settings.worker_tokens for t in out.tokens],
      "seconds": out.seconds,
    }
    append_record(path, row)
    result[p.id] = (row, out.branches)
  return result


def _answers(lm, task, mode, problems, workers, caches, settings, batch_problems):
  """One mode's answers for `problems`: one program for all, or one each (with TTFT)."""
  if not problems:
    return []
  outputs = [workers[p.id]["outputs"] for p in problems]
  if batch_problems == 1:
    return [
      workflow.answer(lm, task, mode, p, o, caches.get(p.id), settings.answer_tokens)
      for p, o in zip(problems, outputs, strict=True)
    ]
  ids = [
    workflow.prompt_ids(lm, task, mode, p, o)[0] for p, o in zip(problems, outputs, strict=True)
  ]
  if not isinstance(mode, workflow.CacheMode):
    return synthesize_text_batch(lm, ids, settings.answer_tokens)
  return synthesize_batch(
    lm,
    [caches[p.id] for p in problems],
    ids,
    None,
    mode.lora,
    settings.answer_tokens,
    num_workers=[len(o) for o in outputs],
    merge=mode.merge,
  )


def recorded_branches(lm, task, row):
  """The Branches of recorded workers (prefill of their prompts + outputs)."""
  tok = lm.require_tokenizer()
  return worker_branches(lm, [task.encode(tok, t) for t in row["prompts"]], row["output_ids"])


def _record_mode(path, done, task, problem, mode, result, settings) -> None:
  row = {
    "kind": "mode",
    "id": problem.id,
    "mode": workflow.mode_name(mode),
    "prediction": result.text,
    "output_tokens": len(result.tokens),
    "truncated": len(result.tokens) >= settings.answer_tokens,
    "score": task.score(result.text, problem),
    "ttft_s": result.ttft_s,
  }
  append_record(path, row)
  done.setdefault(problem.id, {})[row["mode"]] = row


# ---------------------------------------------------------------- results
def rescore(task: Task, problems: Sequence[Problem], rows: Sequence[dict]) -> list[dict]:
  """The records with every mode's score recomputed by `task.score` (no model needed)."""
  by_id = {p.id: p for p in problems}
  out = []
  for row in rows:
    if row["kind"] == "mode" and row["id"] in by_id:
      row = {**row, "score": task.score(row["prediction"], by_id[row["id"]])}
    out.append(row)
  return out


def summarize(rows: Sequence[dict], problems: Sequence[Problem]) -> dict[str, Any]:
  """Accuracy per mode (95 % Wilson interval), truncation, median TTFT, McNemar vs text.

  Only problems in `problems` that every reported mode answered are counted, so
  that every mode is scored on the same set (the paired tests need that).
  """
  workers, modes = by_problem(rows)
  ids = [p.id for p in problems if p.id in modes]
  names = sorted({m for i in ids for m in modes[i]}, key=_mode_order)
  ids = [i for i in ids if all(m in modes[i] for m in names)]
  out: dict[str, Any] = {"num_problems": len(ids), "modes": {}, "paired_vs_text": {}}
  for name in names:
    scores = [modes[i][name]["score"] for i in ids]
    ttfts = [modes[i][name]["ttft_s"] for i in ids[1:] if modes[i][name]["ttft_s"] is not None]
    out["modes"][name] = {
      "accuracy": statistics.fmean(scores) if scores else 0.0,
      "ci95": stats.wilson_interval(sum(scores), len(scores)),
      "truncated": statistics.fmean(modes[i][name]["truncated"] for i in ids) if ids else 0.0,
      # The first problem compiles; the rest are warm (not a benchmark: see bench_ttft).
      "ttft_s_median": statistics.median(ttfts) if ttfts else None,
    }
  text = workflow.TEXT_SYNTHESIS
  if text in names:
    for name in names:
      a = [modes[i][name]["score"] for i in ids]
      b = [modes[i][text]["score"] for i in ids]
      if name != text and all(s in (0, 1) for s in (*a, *b)):
        out["paired_vs_text"][name] = stats.mcnemar_exact(a, b)
  flags = [t for i in ids if i in workers for t in workers[i]["truncated"]]
  out["workers_truncated"] = statistics.fmean(flags) if flags else 0.0
  return out


def _mode_order(name: str) -> tuple[int, str]:
  fixed = (workflow.SINGLE_AGENT, workflow.TEXT_SYNTHESIS, workflow.NAIVE_MERGE)
  return (fixed.index(name), "") if name in fixed else (len(fixed), name)


def format_summary(task_name: str, summary: dict[str, Any]) -> str:
  lines = [f"{task_name}: {summary['num_problems']} problems"]
  lines.append(
    f"{'mode':<32}{'accuracy':>9}{'95% interval':>17}{'truncated':>11}{'ttft ms':>9}{'vs text p':>11}"
  )
  for name, m in summary["modes"].items():
    lo, hi = m["ci95"]
    ttft = f"{1e3 * m['ttft_s_median']:>9.1f}" if m["ttft_s_median"] is not None else f"{'-':>9}"
    paired = summary["paired_vs_text"].get(name)
    p = f"{paired['p_value']:>11.3f}" if paired else f"{'-':>11}"
    lines.append(
      f"{name:<32}{100 * m['accuracy']:>8.1f}%  [{100 * lo:5.1f}, {100 * hi:5.1f}]"
      f"{100 * m['truncated']:>10.1f}%{ttft}{p}"
    )
  lines.append(f"workers: {100 * summary['workers_truncated']:.1f}% of outputs hit their budget")
  return "\n".join(lines)


def plot(task_name: str, summary: dict[str, Any], path: str) -> None:
  """PNG: accuracy per mode with its 95 % interval."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(summary["modes"])
  acc = [100 * summary["modes"][n]["accuracy"] for n in names]
  lo = [a - 100 * summary["modes"][n]["ci95"][0] for a, n in zip(acc, names, strict=True)]
  hi = [100 * summary["modes"][n]["ci95"][1] - a for a, n in zip(acc, names, strict=True)]
  fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
  ax.bar(range(len(names)), acc, yerr=[lo, hi], capsize=4)
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"{task_name} ({summary['num_problems']} problems, 95% intervals)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
