"""What a task is: its problems, its prompts for every role, its target and its score.

The evaluation workflow (`psynth_jax.eval.workflow`), the trace maker
(`experiments/make_traces.py`) and the training batcher (`psynth_jax.train.batching`)
know nothing else about a dataset. A prompt method returns the task's own text;
`Task.render` turns it into the model's input text: unchanged for a raw-text task
(`chat = False`, e.g. the synthetic suite), the user turn of the model's chat
template for a chat task.
"""

from __future__ import annotations

import abc
import dataclasses
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Problem:
  """One question of a task.

  Attributes:
    id: unique within the task.
    question: what every prompt restates.
    answer: the gold answer (`Task.score` compares with it); "" when unknown.
    meta: task-specific fields: `family` (accuracy is reported per family),
      `branches` (gold worker outputs, where the task has them), anything else.
  """

  id: str
  question: str
  answer: str = ""
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def family(self) -> str:
    return self.meta.get("family", "")

  def to_json(self) -> dict[str, Any]:
    return {
      "id": self.id,
      "question": self.question,
      "answer": self.answer,
      "meta": dict(self.meta),
    }

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> Problem:
    return cls(
      str(record["id"]), record["question"], record.get("answer", ""), record.get("meta", {})
    )


def accuracy(scored: Iterable[tuple[str, float]], families: Sequence[str] = ()) -> dict[str, float]:
  """Mean score per family and "overall" from (family, score) pairs: `families`
  first (those present, in that order), then the others as they appear; problems
  without a family ("") count in "overall" only."""
  by_family: dict[str, list[float]] = {f: [] for f in families}
  for family, score in scored:
    by_family.setdefault(family, []).append(float(score))
  out = {f: statistics.fmean(v) for f, v in by_family.items() if v and f}
  every = [s for v in by_family.values() for s in v]
  out["overall"] = statistics.fmean(every) if every else 0.0
  return out


class Task(abc.ABC):
  """A dataset and its prompt formats; see the module docstring.

  Attributes:
    name: the registry name (`psynth_jax.tasks.get(name)`), written as a trace's `task`.
    chat: prompts are user messages for the model's chat template (`render`).
    families: the order accuracy tables list families in (others follow as they appear).
  """

  name: str = ""
  chat: bool = False
  families: tuple[str, ...] = ()

  @abc.abstractmethod
  def load(
    self, path: str | None = None, *, split: str = "test", limit: int | None = None, seed: int = 0
  ) -> list[Problem]:
    """The problems of a split (from `path` when given, else the task's default source)."""

  @abc.abstractmethod
  def worker_prompts(self, problem: Problem, k: int) -> list[str]:
    """The prompts of the problem's k workers, one per branch."""

  @abc.abstractmethod
  def single_agent_prompt(self, problem: Problem) -> str:
    """The single-agent baseline: the question alone."""

  @abc.abstractmethod
  def text_synthesis_prompt(self, problem: Problem, outputs: Sequence[str]) -> str:
    """The text-concatenation synthesizer: every worker output as text, then the question."""

  @abc.abstractmethod
  def synth_prompt(self, problem: Problem) -> str:
    """The cache synthesizer's own prompt, read after the merged branch caches."""

  @abc.abstractmethod
  def target(self, problem: Problem) -> str:
    """The gold completion a synthesizer is trained to write."""

  @abc.abstractmethod
  def score(self, completion: str, problem: Problem) -> float:
    """How right a completion is, in [0, 1]."""

  def branch_from_output(self, text: str) -> str:
    """The branch text of a worker's decoded output (what traces store)."""
    return text

  def branch_as_output(self, branch: str) -> str:
    """A stored branch as its worker wrote it after its prompt (inverse of `branch_from_output`)."""
    return branch

  def render(self, tokenizer, text: str) -> str:
    """The model's input text for one of this task's prompts."""
    if not self.chat:
      return text
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)

  def encode(self, tokenizer, text: str) -> list[int]:
    """Token ids of `render(tokenizer, text)` (no special tokens added)."""
    return tokenizer.encode(self.render(tokenizer, text))

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r})"
