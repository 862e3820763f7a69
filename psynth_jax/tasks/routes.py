"""What the stage-1 training routes share: context chunks as branches, a real target, a report.

Stage 1 of the paper's recipe (`../shared/DESIGN.md` §1.6) trains the synthesizer on
contexts that come in parallel chunks: each chunk is one branch cache, prefilled on its
own from position 0, and the target is a real text that needs them (the final reply of a
chat, the answer a retrieved paragraph supports, ...). Each route is a registered task
(`psynth_jax.tasks.get(name)`): `load` gives problems whose `meta["branches"]` are the
chunks and whose `answer` is the target, and `load_report` also says what was skipped
and why. `psynth_jax.train.stage1` writes them as traces.

The chunks are context, not worker outputs: a route's worker prompts are empty, and its
text-synthesis prompt pastes the chunks with the route's own labels.
"""

from __future__ import annotations

import collections
import hashlib
import random
import re
from collections.abc import Sequence

from psynth_jax.tasks.base import Problem, Task

VALIDATION_PERCENT = 5  # ids whose hash falls in the first 5 of 100 buckets


def split_of(key: str) -> str:
  """ "validation" for a fixed 5 % of keys (by hash, so stable under any filtering), else "train"."""
  bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
  return "validation" if bucket < VALIDATION_PERCENT else "train"


def split_key(problem: Problem) -> str:
  """What decides a problem's split: its `meta["group"]` (the conversation, document or
  passage it shares with other problems, so that no validation target is in a training
  problem's context), else its id."""
  return str(problem.meta.get("group", problem.id))


class Report:
  """Counts of what a loader kept and why it skipped rows (a data card's numbers)."""

  def __init__(self):
    self.rows = 0
    self.kept = 0
    self.skipped: collections.Counter[str] = collections.Counter()
    self.notes: collections.Counter[str] = collections.Counter()

  def skip(self, reason: str) -> None:
    self.skipped[reason] += 1

  def note(self, what: str) -> None:
    self.notes[what] += 1

  def to_json(self) -> dict:
    return {
      "rows": self.rows,
      "kept": self.kept,
      "skipped": dict(self.skipped.most_common()),
      "notes": dict(self.notes.most_common()),
    }


def select(problems: list[Problem], split: str, limit: int | None, seed: int) -> list[Problem]:
  """The split's problems (`split_key`); `limit` of them drawn with `seed`, kept in file order."""
  if split not in ("train", "validation"):
    raise ValueError(f"training routes have splits 'train' and 'validation', not {split!r}")
  problems = [p for p in problems if split_of(split_key(p)) == split]
  if limit is not None and limit < len(problems):
    chosen = set(random.Random(seed).sample(range(len(problems)), limit))
    problems = [p for i, p in enumerate(problems) if i in chosen]
  return problems


def _tokens(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+", text.lower())


def token_f1(prediction: str, reference: str) -> float:
  """Word-overlap F1 (the ChatRAG / SQuAD metric): a readable score for free-text targets."""
  pred, ref = _tokens(prediction), _tokens(reference)
  if not pred or not ref:
    return float(pred == ref)
  common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred), common / len(ref)
  return 2 * precision * recall / (precision + recall)


class RouteTask(Task):
  """A stage-1 route: chat prompts, chunk branches, the target as `answer`, token-F1 score.

  Subclasses set `name`, `context_line` (what the synthesizer is told the latent information is) and
  `instruction`, and implement `read`.
  """

  chat = True
  context_line = "You are given latent information: context chunks."
  instruction = "Answer."

  def read(self, path: str | None = None) -> tuple[list[Problem], Report]:
    """Every usable problem of the source (both splits) and the report of what was skipped."""
    raise NotImplementedError

  def load_report(
    self, path: str | None = None, *, split: str = "train", limit: int | None = None, seed: int = 0
  ) -> tuple[list[Problem], Report]:
    """The split's problems (`limit` drawn with `seed`) and the source's report."""
    problems, report = self.read(path)
    problems = select(problems, split, limit, seed)
    report.kept = len(problems)
    return problems, report

  def load(self, path=None, *, split="train", limit=None, seed=0) -> list[Problem]:
    return self.load_report(path, split=split, limit=limit, seed=seed)[0]

  def worker_prompts(self, problem: Problem, k: int) -> list[str]:
    return [""] * k  # the chunks are context, written by no worker

  def single_agent_prompt(self, problem: Problem) -> str:
    return f"{problem.question}\n\n{self.instruction}"

  def text_synthesis_prompt(self, problem: Problem, outputs: Sequence[str]) -> str:
    blocks = "\n\n".join(out.strip() for out in outputs)
    return f"{self.context_line}\n\n{blocks}\n\n{problem.question}\n\n{self.instruction}"

  def synth_prompt(self, problem: Problem) -> str:
    return f"{self.context_line}\n\n{problem.question}\n\n{self.instruction}"

  def target(self, problem: Problem) -> str:
    return problem.answer

  def score(self, completion: str, problem: Problem) -> float:
    return token_f1(completion, problem.answer)
