"""Workflow-trace examples: a tfds dataset built from local JSONL, and a resumable batch iterator.

One JSONL row is one synthesizer training example:

  {"id": str, "task": str, "question": str, "branches": [str, ...],
   "synth_prompt": str (optional, default ""), "target": str,
   "worker_prompts": [str, ...] (optional, default []), "family": str (optional, default "")}

`task` names a registered task (`psynth_jax.tasks.get`): the batcher builds the
record's prompts with that task's formats, so one file may mix tasks. Every
prompt is the task's own text (`Task.render` makes it the model's input).
`branches` holds the K worker outputs, each of which becomes one branch cache;
K varies per example (an empty list is stored as is). `worker_prompts`, when
given, holds the K prompts the workers wrote them after (one per branch): the
trainer can then encode each branch after its prompt, as the worker did
(`BatchSpec.worker_prompt_tokens`). An empty `synth_prompt` means the task's
own (`Task.synth_prompt`). `family` is a subset of the task (the synthetic
suite's families) for reports. Other keys are rejected, so that a misspelt
optional key cannot silently turn into an empty prompt.

The dataset is written as array_record rather than TFRecord: tfds then needs no
TensorFlow, and `as_data_source()` gives random access. Stored order equals
file order (`disable_shuffling`); all shuffling happens in `BatchIterator`,
where the order is a pure function of (seed, epoch), so a saved
(epoch, index) position resumes exactly.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from psynth_jax.convert.weights import sha256_of

SPLITS = ("train", "validation", "test")
FIELDS = (
  "id",
  "task",
  "question",
  "branches",
  "synth_prompt",
  "target",
  "worker_prompts",
  "family",
)
TEXT_FIELDS = ("id", "task", "question", "synth_prompt", "target", "family")
LIST_FIELDS = ("branches", "worker_prompts")
_DEFAULTS = {"synth_prompt": "", "worker_prompts": [], "family": ""}

Example = dict[str, Any]


class TraceFormatError(ValueError):
  """A JSONL row that is not a valid workflow trace; the message names file and line."""


def _check_row(row: Any, where: str) -> Example:
  """Validates one parsed row and returns it with defaults filled, in `FIELDS` order."""
  if not isinstance(row, dict):
    raise TraceFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
  unknown = sorted(set(row) - set(FIELDS))
  if unknown:
    raise TraceFormatError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(FIELDS)}")
  missing = [key for key in FIELDS if key not in row and key not in _DEFAULTS]
  if missing:
    raise TraceFormatError(f"{where}: missing key(s) {missing}")
  example = {key: row.get(key, _DEFAULTS.get(key)) for key in FIELDS}
  for key in TEXT_FIELDS:
    if not isinstance(example[key], str):
      raise TraceFormatError(
        f"{where}: key {key!r} must be a string, got {type(example[key]).__name__}"
      )
  for key in LIST_FIELDS:
    values = example[key]
    if not isinstance(values, list):
      raise TraceFormatError(
        f"{where}: key {key!r} must be a list of strings, got {type(values).__name__}"
      )
    for i, value in enumerate(values):
      if not isinstance(value, str):
        raise TraceFormatError(f"{where}: {key}[{i}] must be a string, got {type(value).__name__}")
  if example["worker_prompts"] and len(example["worker_prompts"]) != len(example["branches"]):
    raise TraceFormatError(
      f"{where}: {len(example['worker_prompts'])} worker_prompts for"
      f" {len(example['branches'])} branches (give one per branch, or none)"
    )
  return example


def _iter_rows(path: str) -> Iterator[tuple[int, Example]]:
  """Yields (1-based line number, validated example); blank lines are skipped."""
  first_line_of_id: dict[str, int] = {}
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      where = f"{path}:{line_no}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise TraceFormatError(f"{where}: not valid UTF-8 ({e.reason})") from None
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise TraceFormatError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
      example = _check_row(row, where)
      # Ids name examples in eval reports and logs; a repeat is almost surely a bad merge.
      if example["id"] in first_line_of_id:
        raise TraceFormatError(
          f"{where}: duplicate id {example['id']!r} (first seen on line "
          f"{first_line_of_id[example['id']]})"
        )
      first_line_of_id[example["id"]] = line_no
      yield line_no, example


def read_jsonl(path: str | os.PathLike) -> list[Example]:
  """Reads and validates a workflow-trace JSONL file.

  Args:
    path: local JSONL file, one example per line.

  Returns:
    The examples, in file order, with `synth_prompt` defaulted to "".

  Raises:
    TraceFormatError: on bad JSON, a missing or unknown key, a wrong type or a
      repeated id; the message starts with `path:line`.
  """
  return [example for _, example in _iter_rows(os.fspath(path))]


def gold_trace(task, problem, branches=None, target=None) -> Example:
  """A problem's trace: `branches` (default: its gold ones, `meta["branches"]`), the
  prompts their workers saw, and `target` (default: the task's)."""
  branches = list(problem.meta.get("branches", ()) if branches is None else branches)
  if not branches:
    raise ValueError(f"{task.name} problem {problem.id!r} has no gold branches to train on")
  return {
    "id": problem.id,
    "task": task.name,
    "question": problem.question,
    "branches": branches,
    "synth_prompt": task.synth_prompt(problem),
    "target": task.target(problem) if target is None else target,
    "worker_prompts": task.worker_prompts(problem, len(branches)),
    "family": problem.family,
  }


class WorkflowTraces(tfds.core.GeneratorBasedBuilder):
  """Workflow traces from local JSONL files, one file per split, stored as array_record."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.2.0": "`task` is a registered task; optional family; prompts are task text.",
    "1.1.0": "Optional worker_prompts.",
    "1.0.0": "Initial release.",
  }
  # tfds 4.9.10 finds the code path of a builder that lives in a package via the
  # `importlib_resources` backport, which is not installed; give it the file
  # path it falls back to anyway (it only looks for a checksums file beside it).
  code_path = epath.Path(__file__)

  def __init__(self, *, jsonl_paths: Mapping[str, str | os.PathLike] | None = None, **kwargs):
    """Creates the builder.

    Args:
      jsonl_paths: split name ("train", "validation", "test") -> JSONL path.
        Needed to prepare the dataset; leave it out to read a prepared one.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (e.g. `data_dir`).
        `file_format` defaults to "array_record", the format that needs no
        TensorFlow.
    """
    if jsonl_paths is not None:
      unknown = sorted(set(jsonl_paths) - set(SPLITS))
      if unknown or not jsonl_paths:
        raise ValueError(f"jsonl_paths keys must be a non-empty subset of {SPLITS}, got {unknown}")
      jsonl_paths = {split: os.fspath(path) for split, path in jsonl_paths.items()}
    # Set before super().__init__, which already calls _info().
    self._jsonl_paths = jsonl_paths
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = None
    if self._jsonl_paths is not None:
      # Recorded so that build_dataset can tell a stale prepared copy from a fresh one.
      sources = {split: sha256_of(path) for split, path in sorted(self._jsonl_paths.items())}
      metadata = tfds.core.MetadataDict(sources=sources)
    return tfds.core.DatasetInfo(
      builder=self,
      description="Parallel-Synthesis workflow traces: K branch texts, a prompt and a target.",
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "task": tfds.features.Text(),
          "question": tfds.features.Text(),
          "branches": tfds.features.Sequence(tfds.features.Text()),
          "synth_prompt": tfds.features.Text(),
          "target": tfds.features.Text(),
          "worker_prompts": tfds.features.Sequence(tfds.features.Text()),
          "family": tfds.features.Text(),
        }
      ),
      disable_shuffling=True,
      metadata=metadata,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    if self._jsonl_paths is None:
      raise ValueError("WorkflowTraces needs jsonl_paths to prepare the dataset")
    return {split: self._generate_examples(path) for split, path in self._jsonl_paths.items()}

  def _generate_examples(self, path: str):
    yield from _iter_rows(path)


def build_dataset(
  jsonl_paths: Mapping[str, str | os.PathLike], data_dir: str | os.PathLike, *, overwrite=False
) -> WorkflowTraces:
  """Validates the JSONL files and prepares the dataset under `data_dir` (array_record).

  Preparing again with the same file contents reuses the stored copy.

  Args:
    jsonl_paths: split name ("train", "validation", "test") -> JSONL path.
    data_dir: tfds data directory; the dataset lands in
      `data_dir/workflow_traces/1.2.0/`.
    overwrite: replace a copy prepared from different file contents instead of
      raising.

  Returns:
    The prepared builder (`builder.as_data_source(split)` gives raw records).

  Raises:
    TraceFormatError: a bad row (raised before anything is written).
    ValueError: `data_dir` holds a copy built from other contents and
      `overwrite` is False.
  """
  for path in jsonl_paths.values():
    for _ in _iter_rows(os.fspath(path)):  # Fail on a bad row before tfds writes anything.
      pass
  data_dir = os.fspath(data_dir)
  builder = WorkflowTraces(jsonl_paths=jsonl_paths, data_dir=data_dir)
  if builder.is_prepared():
    fresh = {split: sha256_of(os.fspath(path)) for split, path in sorted(jsonl_paths.items())}
    # items() (not get) makes tfds's lazy metadata load the stored copy.
    stored = dict(builder.info.metadata.items()).get("sources")
    if stored == fresh:
      return builder
    if not overwrite:
      raise ValueError(
        f"{builder.data_path} was prepared from other JSONL contents; pass overwrite=True "
        "or use another data_dir"
      )
    builder.data_path.rmtree()
    builder = WorkflowTraces(jsonl_paths=jsonl_paths, data_dir=data_dir)
  builder.download_and_prepare()
  return builder


def _to_str(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _decode(record: Mapping[str, Any]) -> Example:
  example = {key: _to_str(record[key]) for key in TEXT_FIELDS}
  for key in LIST_FIELDS:
    example[key] = [_to_str(value) for value in record[key]]
  return {key: example[key] for key in FIELDS}


class TraceSource(Sequence):
  """Random-access view of one split that returns plain dicts of `str` (and `branches` list)."""

  def __init__(self, records: Sequence[Mapping[str, Any]]):
    self._records = records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> Example:
    n = len(self._records)
    index = index.__index__()
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {n} examples")
    return _decode(self._records[index % n])

  def __getitems__(self, indices: Sequence[int]) -> list[Example]:
    """Reads many examples at once (array_record batches the reads)."""
    return [_decode(record) for record in self._records.__getitems__([int(i) for i in indices])]


def load_split(data_dir: str | os.PathLike, split: str) -> TraceSource:
  """Opens a prepared split for random access.

  Args:
    data_dir: the `data_dir` given to `build_dataset`.
    split: "train", "validation", "test", or a tfds slice such as "train[:10%]".

  Returns:
    A `TraceSource` of examples in file order.
  """
  builder = WorkflowTraces(data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    raise FileNotFoundError(f"no prepared workflow_traces dataset under {data_dir}")
  return TraceSource(builder.as_data_source(split=split))


class BatchIterator:
  """Shuffled batches, sharded over hosts, whose position can be saved and restored.

  Epoch e visits the source in the order `permutation(seed, e)`. Global batch b
  of that epoch is positions [b * batch_size, (b + 1) * batch_size) of the
  permutation, and host p of P takes the p-th contiguous slice of it. Every
  host computes the same permutation, so the slices are disjoint and together
  form the global batch without any communication.

  The position is (epoch, index): how many examples of the epoch's permutation
  earlier global batches consumed. It is identical on every host, and after the
  last batch of an epoch it is already (epoch + 1, 0).

  With `drop_remainder=False` the last global batch of an epoch is short and is
  split as evenly as possible; a host may then get an empty list, so that all
  hosts still take the same number of steps.
  """

  def __init__(
    self,
    source: Sequence[Example],
    *,
    seed: int,
    batch_size: int,
    process_index: int,
    process_count: int,
    drop_remainder: bool = True,
    num_epochs: int | None = None,
  ):
    """Creates the iterator at position (epoch 0, index 0).

    Args:
      source: random-access examples (a `TraceSource` or a plain list).
      seed: non-negative shuffling seed, the same on every host.
      batch_size: global batch size; a multiple of `process_count`.
      process_index: this host's index, `jax.process_index()`.
      process_count: number of hosts, `jax.process_count()`.
      drop_remainder: skip the last short global batch of each epoch.
      num_epochs: stop after this many epochs; None repeats forever.
    """
    n = len(source)
    if batch_size <= 0 or process_count <= 0 or batch_size % process_count:
      raise ValueError(
        f"batch_size ({batch_size}) must be a positive multiple of process_count ({process_count})"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    if n == 0 or (drop_remainder and n < batch_size):
      raise ValueError(f"{n} examples give no batch of {batch_size} per epoch")
    if num_epochs is not None and num_epochs < 0:
      raise ValueError(f"num_epochs must be None or >= 0, got {num_epochs}")
    self.source = source
    self.seed = seed
    self.batch_size = batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.drop_remainder = drop_remainder
    self.num_epochs = num_epochs
    self._epoch = 0
    self._index = 0
    self._perm_epoch = -1
    self._perm = np.zeros(0, np.int64)

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch."""
    n = len(self.source)
    return n // self.batch_size if self.drop_remainder else math.ceil(n / self.batch_size)

  def get_state(self) -> dict[str, int]:
    """Returns the position as a JSON-serialisable dict {"epoch", "index"}."""
    return {"epoch": self._epoch, "index": self._index}

  def set_state(self, state: Mapping[str, int]) -> None:
    """Moves to a position returned by `get_state` (of a run with the same source and seed)."""
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index <= len(self.source):
      raise ValueError(f"invalid iterator state {dict(state)} for {len(self.source)} examples")
    self._epoch, self._index = epoch, index
    self._roll_over()

  def _roll_over(self) -> None:
    """Moves to the next epoch when the current one has no batch left."""
    needed = self.batch_size if self.drop_remainder else 1
    if self._index + needed > len(self.source):
      self._epoch += 1
      self._index = 0

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      # Seeding with the (seed, epoch) pair makes every epoch's order
      # independent of how many epochs were drawn before, which resuming needs.
      rng = np.random.default_rng([self.seed, epoch])
      self._perm = rng.permutation(len(self.source))
      self._perm_epoch = epoch
    return self._perm

  def global_batches(self, epoch: int) -> list[np.ndarray]:
    """The source indices of every global batch of `epoch`, in the order `next` yields them."""
    perm = self._permutation(epoch)
    n, b = len(perm), self.batch_size
    ends = range(b, n + 1, b) if self.drop_remainder else range(b, n + b, b)
    return [perm[end - b : min(end, n)] for end in ends]

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> list[Example]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    perm = self._permutation(self._epoch)
    global_batch = perm[self._index : self._index + self.batch_size]
    local = [int(i) for i in np.array_split(global_batch, self.process_count)[self.process_index]]
    if hasattr(self.source, "__getitems__"):
      batch = list(self.source.__getitems__(local)) if local else []
    else:
      batch = [self.source[i] for i in local]
    self._index += len(global_batch)
    self._roll_over()
    return batch
