"""Trace examples -> fixed-shape token arrays, with token-budget guards.

One example (a `psynth_jax.train.data` record) becomes, with the prompt formats
of the task it names (`psynth_jax.tasks`), so that one batch may mix tasks:

* K branch token rows, each prefilled by the frozen base from position 0: the
  branch alone, or (`BatchSpec.worker_prompt_tokens` > 0 and the record has
  `worker_prompts`) the worker's prompt then the branch, so that the branch's
  cache rows are the ones the worker itself produced while writing it; the step
  keeps only the branch rows, at offset `branch_start` (re-encoded in the merge);
* the synthesizer sequence: its prompt, then the Y target tokens, which reads
  the merged branch caches;
* optionally the text-concatenation teacher's sequence P + Y (its prompt P
  holds every branch as text), for the token-level KL.

Y is tokenised once and appended to both prompts, so target token j sits at
`len(S) + j` for the student and `len(P) + j` for the teacher; the logits that
predict it are one position earlier (`score_pos`, `teacher_pos`). Only those
N target positions are scored.

Every array has a static shape (a `BatchShape`). By default it is the spec's
budgets, so the train step compiles once. With `BatchSpec.bucketed` each batch
is only as large as its longest example needs, rounded up to a bucket (`bucket`:
K in 1, 2, 4, ...; token lengths in powers of two from `MIN_BUCKET`; each
budget is itself the largest bucket), so the step compiles one program per
shape met, of a bounded set. Bucketing changes no loss: it drops padding only
(positions, masks and score positions do not depend on the shape). The worker
prompt width W stays at its budget, because consumers pass it to the step
statically (`StepConfig.worker_prompt_tokens`, the held-out evaluator).

An example that does not fit the budgets (too many branches, a branch or the
sum of branches over budget, a prompt + target too long, an empty target or
prompt) is *skipped*: its row stays padding with zero weight, `skipped` marks
it, and the reason is counted. Padding rows keep the per-host batch size fixed,
which a multi-host step needs (its hosts must also agree on the shape:
`BatchShape.union`).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from psynth_jax import pytree, tasks
from psynth_jax.tasks import Problem, Task

MIN_BUCKET = 32  # the smallest bucket of a token length (a budget below it is its own bucket)

SKIP_REASONS = (
  "too_many_branches",
  "branch_too_long",
  "worker_prompt_too_long",
  "branches_over_budget",
  "synth_too_long",
  "target_too_long",
  "teacher_too_long",
  "empty_target",
  "empty_prompt",
)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static shapes and token budgets (the guards).

  Attributes:
    max_branches: K, branches per example (fewer are padded with empty ones).
    branch_tokens: S, tokens per branch.
    branch_rows: rows of the merged cache, the budget for sum_i len_i.
    synth_tokens: T, synthesizer prompt + target.
    target_tokens: N, scored target tokens per example.
    teacher_tokens: teacher prompt + target; 0 disables the teacher.
    worker_prompt_tokens: W, tokens of a worker prompt before its branch; 0
      encodes every branch alone (from position 0).
    bucketed: shape each batch by its longest example, rounded up to a bucket
      (`Batcher.shape`); False: every batch has the budget shapes.
  """

  max_branches: int
  branch_tokens: int
  branch_rows: int
  synth_tokens: int
  target_tokens: int
  teacher_tokens: int = 0
  worker_prompt_tokens: int = 0
  bucketed: bool = False

  def __post_init__(self):
    for name in ("max_branches", "branch_tokens", "branch_rows", "synth_tokens", "target_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"BatchSpec.{name} must be >= 1, got {getattr(self, name)}")
    if self.target_tokens >= self.synth_tokens:
      raise ValueError("target_tokens must leave room for the prompt in synth_tokens")

  @property
  def budget(self) -> BatchShape:
    """The shape of an unbucketed batch: every budget."""
    return BatchShape(
      self.max_branches,
      self.branch_tokens,
      self.worker_prompt_tokens,
      self.branch_rows,
      self.synth_tokens,
      self.target_tokens,
      self.teacher_tokens,
    )


def bucket(n: int, budget: int, minimum: int = MIN_BUCKET) -> int:
  """The smallest power of two >= n (and >= `minimum`), capped at `budget` (also a bucket)."""
  return min(budget, max(minimum, 1 << max(n - 1, 0).bit_length()))


def buckets(budget: int, minimum: int = MIN_BUCKET) -> tuple[int, ...]:
  """Every value `bucket(n, budget, minimum)` takes for 0 <= n <= budget."""
  return tuple(sorted({bucket(n, budget, minimum) for n in range(budget + 1)}))


@dataclasses.dataclass(frozen=True)
class BatchShape:
  """The static sizes of one batch (at most the spec's budgets); hashable: one per program."""

  branches: int  # K
  branch_tokens: int  # S
  worker_prompt_tokens: int  # W
  branch_rows: int  # merged-cache rows, >= every example's sum_i len_i
  synth_tokens: int  # T
  target_tokens: int  # Y
  teacher_tokens: int  # P, 0 without a teacher

  def union(self, *others: BatchShape) -> BatchShape:
    """The elementwise maximum: a shape every one of them fits (hosts of one step agree on it)."""
    rows = [dataclasses.astuple(x) for x in (self, *others)]
    return BatchShape(*(max(column) for column in zip(*rows, strict=True)))


@pytree.dataclass
class Batch:
  """Token arrays of B examples (numpy on the host, jax arrays inside the step)."""

  branch_tokens: Any  # [B, K, W + S] int32: worker prompt (if any), branch, padding
  branch_mask: Any  # [B, K, W + S] bool, True on prompt and branch tokens
  branch_start: Any  # [B, K] int32, where the branch starts in its row (prompt length)
  num_workers: Any  # [B] int32, real branches per example
  tokens: Any  # [B, T] int32, synthesizer prompt + target, right-padded
  mask: Any  # [B, T] bool
  score_pos: Any  # [B, Y] int32, student positions whose logits predict `labels`
  labels: Any  # [B, Y] int32, target tokens
  weights: Any  # [B, Y] float32, 1 for real target tokens
  skipped: Any  # [B] int32, 1 for a skipped example (its row is padding)
  teacher_tokens: Any = None  # [B, P] int32, teacher prompt + target
  teacher_mask: Any = None  # [B, P] bool
  teacher_pos: Any = None  # [B, Y] int32


# ---------------------------------------------------------------- prompts
def task_of(example: Mapping[str, Any]) -> Task:
  """The registered task a trace record names (its prompt formats)."""
  try:
    return tasks.get(example["task"])
  except KeyError:
    raise ValueError(
      f"trace {example.get('id')!r} names task {example['task']!r}, which is not registered"
      f" ({tasks.names()}); synthetic-suite traces name task 'synthetic' and put the suite's"
      " family in `family`"
    ) from None


def trace_problem(example: Mapping[str, Any]) -> Problem:
  """What a task's prompt methods read from a trace record."""
  return Problem(example["id"], example["question"], meta={"family": example.get("family", "")})


def synth_prompt(example: Mapping[str, Any]) -> str:
  """The synthesizer prompt (task text): the record's own `synth_prompt`, else the task's."""
  return example.get("synth_prompt") or task_of(example).synth_prompt(trace_problem(example))


def teacher_prompt(example: Mapping[str, Any]) -> str:
  """The text-concatenation prompt P (task text: every branch as text, then the question)."""
  return task_of(example).text_synthesis_prompt(trace_problem(example), example["branches"])


# ---------------------------------------------------------------- batcher
class Batcher:
  """Tokenises examples into a `Batch` of a fixed size, skipping those over budget."""

  def __init__(self, tokenizer, spec: BatchSpec, pad_id: int, eos_id: int | None):
    """Creates the batcher.

    Args:
      tokenizer: anything with `encode(text) -> list[int]` (no special tokens
        added), and `apply_chat_template` for records of a chat task.
      spec: shapes and budgets.
      pad_id: id written into padding (always masked).
      eos_id: appended to targets that do not already end with it, so the
        synthesizer learns to stop; None to leave targets as they are.
    """
    self.tokenizer, self.spec = tokenizer, spec
    self.pad_id, self.eos_id = pad_id, eos_id

  def encode(self, example: Mapping[str, Any]) -> tuple[dict[str, list] | None, str | None]:
    """(token lists, None) for an example that fits, else (None, skip reason)."""
    spec, tok, task = self.spec, self.tokenizer, task_of(example)
    branches = [tok.encode(task.branch_as_output(b)) for b in example["branches"]]
    workers = [[] for _ in branches]
    if spec.worker_prompt_tokens and example.get("worker_prompts"):
      workers = [task.encode(tok, w) for w in example["worker_prompts"]]
    target = tok.encode(example["target"])
    if target and self.eos_id is not None and target[-1] != self.eos_id:
      target.append(self.eos_id)
    prompt = task.encode(tok, synth_prompt(example))
    teacher = None
    if spec.teacher_tokens:
      teacher = task.encode(tok, teacher_prompt(example))
    checks = (
      ("too_many_branches", len(branches) > spec.max_branches),
      ("branch_too_long", any(len(b) > spec.branch_tokens for b in branches)),
      ("worker_prompt_too_long", any(len(w) > spec.worker_prompt_tokens for w in workers)),
      ("branches_over_budget", sum(len(b) for b in branches) > spec.branch_rows),
      ("empty_target", not target),
      ("empty_prompt", not prompt or (teacher is not None and not teacher)),
      ("target_too_long", len(target) > spec.target_tokens),
      ("synth_too_long", len(prompt) + len(target) > spec.synth_tokens),
      (
        "teacher_too_long",
        teacher is not None and len(teacher) + len(target) > spec.teacher_tokens,
      ),
    )
    for reason, failed in checks:
      if failed:
        return None, reason
    encoded = {"branches": branches, "workers": workers, "prompt": prompt, "target": target}
    return {**encoded, "teacher": teacher}, None

  def encode_all(
    self, examples: Sequence[Mapping[str, Any]]
  ) -> tuple[list[dict[str, list] | None], collections.Counter]:
    """`encode` of each example (None for a skipped one) and a Counter of skip reasons."""
    encoded, reasons = [], collections.Counter()
    for example in examples:
      tokens, reason = self.encode(example)
      encoded.append(tokens)
      if reason is not None:
        reasons[reason] += 1
    return encoded, reasons

  def shape(self, encoded: Sequence[dict[str, list] | None]) -> BatchShape:
    """The shape of a batch of `encoded` (`encode_all`): the budgets, or their buckets.

    Bucketed, every size is the smallest bucket that holds the longest example
    (the sum of branch lengths for `branch_rows`); a batch of skipped examples
    only gets the smallest buckets.
    """
    spec = self.spec
    if not spec.bucketed:
      return spec.budget
    kept = [e for e in encoded if e is not None]

    def longest(length) -> int:
      return max((length(e) for e in kept), default=0)

    k = longest(lambda e: len(e["branches"]))
    s = longest(lambda e: max((len(b) for b in e["branches"]), default=0))
    rows = longest(lambda e: sum(len(b) for b in e["branches"]))
    t = longest(lambda e: len(e["prompt"]) + len(e["target"]))
    y = longest(lambda e: len(e["target"]))
    p = longest(lambda e: len(e["teacher"]) + len(e["target"])) if spec.teacher_tokens else 0
    return BatchShape(
      bucket(k, spec.max_branches, 1),
      bucket(s, spec.branch_tokens),
      spec.worker_prompt_tokens,
      bucket(rows, spec.branch_rows),
      bucket(t, spec.synth_tokens),
      bucket(y, spec.target_tokens),
      bucket(p, spec.teacher_tokens) if spec.teacher_tokens else 0,
    )

  def pack(
    self, encoded: Sequence[dict[str, list] | None], batch_size: int, shape: BatchShape
  ) -> Batch:
    """`encode_all`'s token lists -> a Batch of `batch_size` rows of `shape` (numpy)."""
    b = batch_size
    if len(encoded) > b:
      raise ValueError(f"{len(encoded)} examples do not fit a batch of {b}")
    k, s, w = shape.branches, shape.branch_tokens, shape.worker_prompt_tokens
    t, n, p = shape.synth_tokens, shape.target_tokens, shape.teacher_tokens
    out = {
      "branch_tokens": np.full((b, k, w + s), self.pad_id, np.int32),
      "branch_mask": np.zeros((b, k, w + s), bool),
      "branch_start": np.zeros((b, k), np.int32),
      "num_workers": np.zeros((b,), np.int32),
      "tokens": np.full((b, t), self.pad_id, np.int32),
      "mask": np.zeros((b, t), bool),
      "score_pos": np.zeros((b, n), np.int32),
      "labels": np.zeros((b, n), np.int32),
      "weights": np.zeros((b, n), np.float32),
      "skipped": np.zeros((b,), np.int32),
    }
    if p:
      out["teacher_tokens"] = np.full((b, p), self.pad_id, np.int32)
      out["teacher_mask"] = np.zeros((b, p), bool)
      out["teacher_pos"] = np.zeros((b, n), np.int32)
    for row, encoded_row in enumerate(encoded):
      if encoded_row is None:
        out["skipped"][row] = 1
        continue
      for i, (worker, branch) in enumerate(
        zip(encoded_row["workers"], encoded_row["branches"], strict=True)
      ):
        seq = worker + branch
        out["branch_tokens"][row, i, : len(seq)] = seq
        out["branch_mask"][row, i, : len(seq)] = True
        out["branch_start"][row, i] = len(worker)
      out["num_workers"][row] = len(encoded_row["branches"])
      target, prompt = encoded_row["target"], encoded_row["prompt"]
      seq = prompt + target
      out["tokens"][row, : len(seq)] = seq
      out["mask"][row, : len(seq)] = True
      nt = len(target)
      out["score_pos"][row, :nt] = len(prompt) - 1 + np.arange(nt)
      out["labels"][row, :nt] = target
      out["weights"][row, :nt] = 1.0
      if p:
        teacher = encoded_row["teacher"] + target
        out["teacher_tokens"][row, : len(teacher)] = teacher
        out["teacher_mask"][row, : len(teacher)] = True
        out["teacher_pos"][row, :nt] = len(encoded_row["teacher"]) - 1 + np.arange(nt)
    return Batch(**out)

  def __call__(
    self,
    examples: Sequence[Mapping[str, Any]],
    batch_size: int | None = None,
    shape: BatchShape | None = None,
  ) -> tuple[Batch, collections.Counter]:
    """Tokenises `examples` into a Batch of `batch_size` rows (default: len(examples)).

    Args:
      examples: trace records.
      batch_size: rows of the batch (skipped and missing examples are padding).
      shape: the batch's shape; default `self.shape` of these examples.

    Returns:
      The batch (numpy arrays) and a Counter of skip reasons.
    """
    b = len(examples) if batch_size is None else batch_size
    if len(examples) > b:
      raise ValueError(f"{len(examples)} examples do not fit a batch of {b}")
    encoded, reasons = self.encode_all(examples)
    return self.pack(encoded, b, self.shape(encoded) if shape is None else shape), reasons


def token_counts(batch: Batch) -> dict[str, int]:
  """Tokens a step processes: branch prefill, synthesizer, teacher, and scored targets."""
  counts = {
    "branch_tokens": int(np.sum(batch.branch_mask)),
    "synth_tokens": int(np.sum(batch.mask)),
    "target_tokens": int(np.sum(batch.weights)),
  }
  counts["teacher_tokens"] = 0 if batch.teacher_mask is None else int(np.sum(batch.teacher_mask))
  return counts
