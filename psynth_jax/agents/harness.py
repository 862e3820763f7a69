"""The agent benchmark behind `psynth agents`: workers once, then every mode, resumable.

For each episode of an agent task (GAIA-style, database diagnosis) the K worker agents
run once (greedy, the base model, ReAct with the episode's tools); the workers of
`batch_episodes` episodes run together on one batched cache (`run_workers`). Then every
mode answers as a ReAct agent with the episode's tools:
  single_agent     one agent on the task's single-agent prompt (the episodes' agents batched);
  text_synthesis   the worker texts (their memory mode's tokens) pasted into the task's
                   text-synthesis prompt, on a cache kept across its turns;
  naive_merge, ... the task's synthesizer prompt over the merged worker caches as a
                   persistent latent prefix, with each mode's mapper / LoRA.
The synthesizers run one episode at a time, so their `ttft_s` is their first step.

Records (`WORKDIR/records.jsonl`, one line per event; `run.json` pins task, model and
settings as `psynth eval` does):
  {"kind": "workers", "id", "conversations": per worker [{"input", "output"} per turn],
   "answers", "tool_calls", "stopped", "truncated", "texts", "seconds"}
  {"kind": "mode", "id", "mode", "prediction", "score", "partial", "tool_calls", "steps",
   "stopped", "output_tokens", "truncated", "ttft_s", "prefilled", "seconds", "load1"}
`score` is 1 for a correct episode (GAIA: exact match; MARBLE: every gold cause named),
`partial` the task's own score (MARBLE: hits / |gold|). A re-run skips what is recorded and
rebuilds recorded workers' branches by replaying their conversations (`replay`), so a new
adapter runs only its own mode. `truncated`: some turn used its whole token budget.
`load1` is the 1-minute load average when the mode finished: TTFTs taken under load are
not benchmarks (the idle pass is `experiments/bench_ttft.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from psynth_jax.agents.environments import environment_for
from psynth_jax.agents.episode import WorkerRun, run_synthesizer, run_workers
from psynth_jax.agents.memory import MEMORY_MODES, memory_branches
from psynth_jax.agents.react import MAX_STEPS, Agent, Episode, run_react_batch
from psynth_jax.agents.session import CacheSession
from psynth_jax.agents.tool_calls import ChatFormat
from psynth_jax.eval import harness, workflow
from psynth_jax.operators import Reencode
from psynth_jax.tasks import Problem, Task


@dataclasses.dataclass(frozen=True)
class AgentSettings:
  """What makes two runs' records comparable (recorded in run.json)."""

  num_workers: int = 3  # GAIA-style workers; database episodes have one per expert
  memory: str = "final"  # the workers' memory mode (`memory.MEMORY_MODES`)
  max_steps: int = MAX_STEPS  # tool steps per agent
  worker_tokens: int = 256  # budget per worker turn
  answer_tokens: int = 256  # budget per single-agent / synthesizer turn
  capacity: int = 6144  # cache rows per conversation
  final_without_calls: bool = False  # every agent's last turn cannot call (`react`)

  def __post_init__(self):
    if self.memory not in MEMORY_MODES:
      raise ValueError(f"memory must be one of {MEMORY_MODES}, got {self.memory!r}")


# ---------------------------------------------------------------- conversations
def conversation(row) -> list[dict[str, list[int]]]:
  """A conversation's turns as recorded: each turn's input ids and output ids."""
  row.flush()
  inputs: list[list[int]] = [[] for _ in row.turns]
  for w in row.written:
    if not w.output:
      inputs[w.turn].append(w.id)
  return [{"input": i, "output": t.output} for i, t in zip(inputs, row.turns, strict=True)]


def replay(lm, turns: Sequence[dict], capacity: int) -> CacheSession:
  """A batch-1 session holding a recorded conversation (`conversation`), as if it had run."""
  session = CacheSession.text(lm, 1, capacity)
  for turn in turns:
    session.replay(turn["input"], turn["output"])
  return session


def _truncated(row, budget: int) -> bool:
  return any(len(t.output) >= budget for t in row.turns)


# ---------------------------------------------------------------- running
def evaluate_agents(
  lm,
  task: Task,
  problems: Sequence[Problem],
  workdir: str,
  modes: Sequence[workflow.CacheMode] = (workflow.CacheMode(workflow.NAIVE_MERGE),),
  settings: AgentSettings = AgentSettings(),
  single_agent: bool = True,
  text: bool = True,
  adapters: dict[str, str] | None = None,
  batch_episodes: int = 8,
  progress: bool = True,
) -> list[dict[str, Any]]:
  """Runs what is not yet recorded for every episode; returns all records of the workdir.

  Args: as `psynth_jax.eval.harness.evaluate`; `batch_episodes` episodes' workers (and
  single agents) share one batched session (database episodes: one at a time).
  """
  if any(isinstance(m, workflow.CacheMode) and type(m.merge) is not Reencode for m in modes):
    raise NotImplementedError(
      "agent sessions merge with the paper's operator (a mapper); other merge operators"
      " (psynth_jax.operators) are not wired into CacheSession"
    )
  from tqdm.auto import tqdm

  recorded = dataclasses.asdict(settings)
  if not settings.final_without_calls:  # the behaviour of runs recorded before the flag
    del recorded["final_without_calls"]
  info = {
    "task": task.name,
    "fingerprint": lm.params.fingerprint,
    "settings": recorded,
    "adapters": dict(adapters or {}),
  }
  harness.check_run(workdir, info)
  path = os.path.join(workdir, harness.RECORDS)
  workers, done = harness.by_problem(harness.read_records(path))
  wanted = workflow.wanted_modes(modes, single_agent, text)
  tok = lm.require_tokenizer()
  bar = tqdm(total=len(problems), desc=task.name, disable=not progress, mininterval=2)
  with environment_for(task, settings.num_workers) as env:
    size = max(1, min(batch_episodes, env.max_episodes))
    for start in range(0, len(problems), size):
      chunk = problems[start : start + size]
      todo = {
        p.id: [m for m in wanted if workflow.mode_name(m) not in done.get(p.id, {})] for p in chunk
      }
      chunk = [p for p in chunk if todo[p.id]]
      if not chunk:
        bar.update(len(problems[start : start + size]))
        continue
      with contextlib.ExitStack() as stack:
        setups = {
          p.id: stack.enter_context(env.episode(p, os.path.join(workdir, "episodes", p.id)))
          for p in chunk
        }
        t0 = time.perf_counter()
        log = _step_log(bar, "workers", t0) if progress else None
        fresh = _run_workers(
          lm, tok, [p for p in chunk if p.id not in workers], setups, settings, log
        )
        for pid, (row, _) in fresh.items():
          harness.append_record(path, row)
          workers[pid] = row
        if fresh and progress:
          bar.write(f"  workers of {len(fresh)} episodes: {time.perf_counter() - t0:.0f} s")
        branches = {pid: run.branches for pid, (_, run) in fresh.items()}
        for mode in wanted:
          who = [p for p in chunk if mode in todo[p.id]]
          if not who:
            continue
          t0 = time.perf_counter()
          if mode == workflow.SINGLE_AGENT:
            log = _step_log(bar, "single agents", t0) if progress else None
            results = _single_agents(lm, tok, task, who, setups, settings, log)
          else:
            results = []
            for p in who:
              if isinstance(mode, workflow.CacheMode) and p.id not in branches:
                branches[p.id] = _rebuild(lm, workers[p.id], settings)
              results.append(
                _synthesizer(
                  lm, tok, task, mode, p, setups[p.id], workers[p.id], branches.get(p.id), settings
                )
              )
          for p, (row, _) in zip(who, results, strict=True):
            row.update(_scores(task, p, row["prediction"]), id=p.id, mode=workflow.mode_name(mode))
            row["load1"] = os.getloadavg()[0]
            harness.append_record(path, row)
            done.setdefault(p.id, {})[row["mode"]] = row
          if progress:
            name = workflow.mode_name(mode)
            bar.write(f"  {name} of {len(who)}: {time.perf_counter() - t0:.0f} s")
      bar.update(len(problems[start : start + size]))
  bar.close()
  return harness.read_records(path)


def _agent(tok, messages, toolbox) -> Agent:
  return Agent(ChatFormat(tok, toolbox.schemas()), messages, toolbox)


def _step_log(bar, what: str, t0: float):
  def log(step: int, running: int) -> None:
    bar.write(f"    {what} step {step}: {running} still running ({time.perf_counter() - t0:.0f} s)")

  return log


def _run_workers(lm, tok, problems, setups, settings, log) -> dict[str, tuple[dict, WorkerRun]]:
  if not problems:
    return {}
  episodes = [[_agent(tok, m, box) for m, box in setups[p.id].workers] for p in problems]
  runs = run_workers(
    lm,
    episodes,
    settings.memory,
    max_steps=settings.max_steps,
    max_new_tokens=settings.worker_tokens,
    capacity=settings.capacity,
    on_step=log,
    final_without_calls=settings.final_without_calls,
  )
  out = {}
  for p, run in zip(problems, runs, strict=True):
    row = {
      "kind": "workers",
      "id": p.id,
      "conversations": [conversation(r) for r in run.rows],
      "answers": [e.answer for e in run.episodes],
      "tool_calls": [e.num_tool_calls for e in run.episodes],
      "stopped": [e.stopped for e in run.episodes],
      "truncated": [_truncated(r, settings.worker_tokens) for r in run.rows],
      "texts": run.texts,
      "seconds": run.seconds,
    }
    out[p.id] = (row, run)
  return out


def _rebuild(lm, row, settings):
  sessions = [replay(lm, turns, settings.capacity) for turns in row["conversations"]]
  return memory_branches(sessions, settings.memory)


def _mode_row(episode: Episode, session, budget: int, ttft_s, seconds) -> dict[str, Any]:
  turns = session.turns
  return {
    "kind": "mode",
    "prediction": episode.answer,
    "tool_calls": episode.num_tool_calls,
    "steps": len(episode.steps),
    "stopped": episode.stopped,
    "output_tokens": sum(len(t.output) for t in turns),
    "truncated": any(len(t.output) >= budget for t in turns),
    "ttft_s": ttft_s,
    "prefilled": session.prefilled,
    "seconds": seconds,
  }


def _single_agents(lm, tok, task, problems, setups, settings, log):
  agents = [
    _agent(tok, [{"role": "user", "content": task.single_agent_prompt(p)}], setups[p.id].toolbox)
    for p in problems
  ]
  t0 = time.perf_counter()
  session = CacheSession.text(lm, settings.answer_tokens, settings.capacity, batch=len(agents))
  episodes = run_react_batch(session, agents, settings.max_steps, log, settings.final_without_calls)
  seconds = time.perf_counter() - t0
  # Batched: no TTFT of its own (the synthesizers' is the measured one).
  return [
    (_mode_row(e, session.row(b), settings.answer_tokens, None, seconds), e)
    for b, e in enumerate(episodes)
  ]


def _synthesizer(lm, tok, task, mode, problem, setup, workers_row, branches, settings):
  budget = dict(
    max_steps=settings.max_steps,
    max_new_tokens=settings.answer_tokens,
    capacity=settings.capacity,
    final_without_calls=settings.final_without_calls,
  )
  if mode == workflow.TEXT_SYNTHESIS:
    prompt = task.text_synthesis_prompt(problem, workers_row["texts"])
    agent = _agent(tok, [{"role": "user", "content": prompt}], setup.toolbox)
    run = run_synthesizer(lm, agent, **budget)
  else:
    agent = _agent(tok, [{"role": "user", "content": task.synth_prompt(problem)}], setup.toolbox)
    k = len(workers_row["conversations"])
    run = run_synthesizer(lm, agent, branches, mode.mapper, mode.lora, num_workers=k, **budget)
  row = _mode_row(run.episode, run.session, settings.answer_tokens, run.ttft_s, run.total_s)
  return row, run.episode


def _scores(task, problem, prediction: str) -> dict[str, float]:
  partial = float(task.score(prediction, problem))
  return {"score": float(partial == 1.0), "partial": partial}


# ---------------------------------------------------------------- results
def summarize_agents(rows: Sequence[dict], problems: Sequence[Problem]) -> dict[str, Any]:
  """`harness.summarize` (accuracy = fraction correct, intervals, McNemar vs text, TTFT),
  plus per mode the mean partial score, tool calls per episode and the median load."""
  out = harness.summarize(rows, problems)
  workers, modes = harness.by_problem(rows)
  ids = [p.id for p in problems if p.id in modes and all(m in modes[p.id] for m in out["modes"])]
  for name, m in out["modes"].items():
    got = [modes[i][name] for i in ids]
    m["partial"] = statistics.fmean(r["partial"] for r in got) if got else 0.0
    m["tool_calls"] = statistics.fmean(r["tool_calls"] for r in got) if got else 0.0
    m["load1_median"] = statistics.median(r["load1"] for r in got) if got else None
  calls = [c for i in ids if i in workers for c in workers[i]["tool_calls"]]
  out["worker_tool_calls"] = statistics.fmean(calls) if calls else 0.0
  return out


def format_agent_summary(task_name: str, summary: dict[str, Any]) -> str:
  lines = harness.format_summary(task_name, summary).splitlines()
  lines.append(f"{'mode':<32}{'partial':>9}{'tool calls':>12}{'load':>7}")
  for name, m in summary["modes"].items():
    load = f"{m['load1_median']:>7.1f}" if m["load1_median"] is not None else f"{'-':>7}"
    lines.append(f"{name:<32}{m['partial']:>9.3f}{m['tool_calls']:>12.2f}{load}")
  lines.append(f"workers: {summary['worker_tool_calls']:.2f} tool calls each on average")
  return "\n".join(lines)
