"""Where an agent episode runs: its workers' first messages and tools, and the tools of the
single agent and the synthesizers (`psynth_jax.agents.harness`).

  with environment_for(task) as env:
    with env.episode(problem, workdir) as setup:
      setup.workers    # [(messages, Toolbox)] per worker
      setup.toolbox    # the single agent's and the synthesizers' tools

* GAIA-style (`gaia_offline`, `gaia`): K workers with the task's worker prompts (one angle
  each) and the episode's tools (search / visit over its documents, parse_file, python; GAIA
  proper: its attachment, no corpus), which the synthesizers get too. Episodes are
  independent: many can be open at once (`max_episodes`).
* Database diagnosis (`marble_db_offline`, `marble_db`): one PostgreSQL 15 server for the
  run, a fresh database per episode with its anomalies induced (`db_scenarios.Scenario`);
  the workers are MARBLE's experts (`db_tools.EXPERTS`: a brief each, as a system message,
  and its read-only tools); the single agent and the synthesizers get every database tool.
  One episode at a time: its evidence (held locks, waiters) lives while it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence

from psynth_jax.agents.tools import Toolbox
from psynth_jax.tasks import Problem, Task


@dataclasses.dataclass
class Setup:
  workers: list[tuple[list[dict], Toolbox]]
  toolbox: Toolbox


def _user(text: str) -> list[dict]:
  return [{"role": "user", "content": text}]


class GaiaEnvironment(contextlib.AbstractContextManager):
  max_episodes = 1 << 30

  def __init__(self, task: Task, num_workers: int):
    self.task, self.num_workers = task, num_workers

  def __exit__(self, *exc) -> None:
    return None

  @contextlib.contextmanager
  def episode(self, problem: Problem, workdir: str) -> Iterator[Setup]:
    from psynth_jax.tasks import gaia_offline

    box = gaia_offline.toolbox(problem, os.path.join(workdir, "files"))
    prompts = self.task.worker_prompts(problem, self.num_workers)
    yield Setup([(_user(p), box) for p in prompts], box)


class DatabaseEnvironment(contextlib.AbstractContextManager):
  max_episodes = 1

  def __init__(self, task: Task, experts: Sequence[str] | None = None):
    from psynth_jax.agents import db_tools

    self.task = task
    self.experts = {n: db_tools.EXPERTS[n] for n in experts or db_tools.EXPERTS}
    self._stack = contextlib.ExitStack()
    self._server = None

  def __exit__(self, *exc) -> None:
    self._stack.close()

  @contextlib.contextmanager
  def episode(self, problem: Problem, workdir: str) -> Iterator[Setup]:
    from psynth_jax.agents import db_tools
    from psynth_jax.agents.db_scenarios import Scenario
    from psynth_jax.agents.postgres import PostgresServer

    del workdir  # the database lives in the server's own temp dir
    if self._server is None:
      self._server = self._stack.enter_context(PostgresServer())
    meta = problem.meta
    if "domain" in meta:  # generated (`marble_db_offline`): rebuilt from its seed
      causes = [a["anomaly"] for a in meta["anomalies"]]
      scenario = Scenario(causes, meta["seed"], meta["domain"], self._server)
    else:  # one of MARBLE's own tasks
      scenario = Scenario.from_problem(problem, self._server)
    with scenario as env:
      boxes = db_tools.expert_toolboxes(env.agent, self.experts)
      prompts = self.task.worker_prompts(problem, len(self.experts))
      workers = [
        ([{"role": "system", "content": e.profile}, *_user(p)], boxes[n])
        for (n, e), p in zip(self.experts.items(), prompts, strict=True)
      ]
      yield Setup(workers, Toolbox(db_tools.database_tools(env.agent).values()))


def environment_for(task: Task, num_workers: int = 3):
  """The environment of an agent task (GAIA-style or database diagnosis)."""
  from psynth_jax.tasks.agents import GAIATask, MarbleDBTask

  if isinstance(task, GAIATask):
    return GaiaEnvironment(task, num_workers)
  if isinstance(task, MarbleDBTask):
    return DatabaseEnvironment(task)
  raise ValueError(f"{task.name!r} is no agent task (GAIA-style or database diagnosis)")
