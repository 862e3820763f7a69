"""Agent benchmarks read from a local copy: GAIA and MARBLE's database root-cause diagnosis.

Neither benchmark's data is in a package (GAIA is gated on the Hugging Face hub;
MARBLE's tasks ship in its GitHub repository), so `load(path)` has no default
source and says where to get the data. Only loading, prompts and scoring live
here; the agent workflows (tools, ReAct loops, MARBLE's PostgreSQL environment)
are a later layer that reads the `meta` these problems carry.

Prompts are the protocol's (`BenchmarkTask`, `prompts.json`), except the answer
format: each benchmark scores its own answer line ("FINAL ANSWER: ..." for GAIA,
as its paper's system prompt asks; "ROOT CAUSES: ..." for MARBLE, where how many
causes to name differs per problem). Those are not `prompts.json` kinds — that
file's kinds are shared by every benchmark and carry no per-problem values — so
`AgentTask.instruction(problem)` supplies the format instead. Both are
evaluation sets: `target` refuses.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from typing import Any

from psynth_jax.tasks import answers
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.benchmark import BenchmarkTask, MissingDataError


def answer_span(completion: str, marker: str) -> str:
  """The part of a completion that states its answer: the rest of the last `marker:` line
  (or the next non-empty line when that is empty), else the last \\boxed{}, else the last
  non-empty line. Models trained on boxed math still get scored; the last line catches a
  bare answer. Surrounding markdown emphasis or backticks are dropped."""
  lines = completion.splitlines()
  pattern = re.compile(rf"{re.escape(marker)}\s*:\s*(.*)", re.IGNORECASE)
  for n in range(len(lines) - 1, -1, -1):
    if match := pattern.search(lines[n]):
      rest = [match.group(1), *lines[n + 1 :]]
      span = next((line for line in rest if line.strip()), "")
      break
  else:
    boxed = answers.last_boxed(completion)
    span = boxed if boxed is not None else next((s for s in reversed(lines) if s.strip()), "")
  return span.strip().strip("*`").strip()


# --- GAIA ------------------------------------------------------------------------------------

GAIA_SPLITS = ("validation", "test")
GAIA_LEVELS = (1, 2, 3)
GAIA_HOWTO = (
  "GAIA's data is gated and in no package: accept its terms at"
  " https://huggingface.co/datasets/gaia-benchmark/GAIA, download the 2023 release (e.g."
  " `huggingface-cli download gaia-benchmark/GAIA --repo-type dataset --local-dir ~/data/GAIA`),"
  " and pass its split folder, the one holding metadata.jsonl and the attached files"
  " (`load('~/data/GAIA/2023/validation')`), that metadata.jsonl, or the download folder"
  " itself (the split is then found under 2023/<split>/)"
)
# The GAIA paper's answer rules (Mialon et al. 2023, the system prompt of its Figure 2), in
# our words: the scorer below compares exactly what these rules ask for.
GAIA_INSTRUCTION = (
  "End with the line 'FINAL ANSWER: <answer>', where the answer is a number, as few words as"
  " possible, or a comma separated list of numbers and/or strings. Write numbers without"
  " thousands separators or units such as $ or % unless the question asks for them; write"
  " strings without articles or abbreviations, and digits as numerals unless asked otherwise."
)


def _gaia_float(text: str) -> float:
  """A number as GAIA's scorer reads it: `$`, `%` and `,` removed; anything else is no number."""
  for char in "$%,":
    text = text.replace(char, "")
  try:
    return float(text)
  except ValueError:
    return float("inf")


def _is_float(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def _gaia_str(text: str, remove_punct: bool = True) -> str:
  text = re.sub(r"\s", "", text).lower()
  return text.translate(str.maketrans("", "", string.punctuation)) if remove_punct else text


def gaia_match(model_answer: str | None, ground_truth: str) -> bool:
  """GAIA's quasi-exact match, our implementation of the official scorer's rules.

  Rules (`question_scorer` in scorer.py of the gaia-benchmark/leaderboard Hugging Face
  space, https://huggingface.co/spaces/gaia-benchmark/leaderboard/blob/main/scorer.py, as
  vendored in many public agent repositories):
  * a gold answer that parses as a float is a number: the model answer, with `$`, `%` and
    `,` removed, must parse to the same float ("1,234" and "$1234" match 1234; "17 km" does
    not match 17);
  * else a gold answer containing `,` or `;` is a list: both are split on `,` and `;`, the
    lengths must agree, and each element is compared as a number (rule above) when its gold
    element is one, else as a string with whitespace removed and lowercased (punctuation kept);
  * else both are strings compared with whitespace and punctuation removed, lowercased.
  A missing answer (None) is the string "None", as upstream.
  """
  model_answer = "None" if model_answer is None else str(model_answer)
  ground_truth = str(ground_truth)
  if _is_float(ground_truth):
    return _gaia_float(model_answer) == float(ground_truth)
  if any(char in ground_truth for char in ",;"):
    gold, pred = re.split(r"[,;]", ground_truth), re.split(r"[,;]", model_answer)
    if len(gold) != len(pred):
      return False
    return all(
      _gaia_float(p) == float(g)
      if _is_float(g)
      else _gaia_str(p, remove_punct=False) == _gaia_str(g, remove_punct=False)
      for p, g in zip(pred, gold, strict=True)
    )
  return _gaia_str(model_answer) == _gaia_str(ground_truth)


def _read_records(path: str) -> list[dict[str, Any]]:
  """Rows of a JSONL file, or of a parquet file (newer snapshots of GAIA ship metadata.parquet)."""
  if path.endswith(".parquet"):
    try:
      import pyarrow.parquet as pq
    except ImportError as e:
      raise MissingDataError(f"reading {path} needs pyarrow: `pip install pyarrow`") from e
    return pq.read_table(path).to_pylist()
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _gaia_metadata(path: str | None, split: str) -> str:
  """The metadata file of `split` for a split folder, a metadata file or a download folder."""
  if path is None:
    raise MissingDataError(f"gaia has no default source. {GAIA_HOWTO}")
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path):
    found = path
  else:
    folders = (path, os.path.join(path, split), os.path.join(path, "2023", split))
    names = ("metadata.jsonl", "metadata.parquet")
    candidates = [os.path.join(d, n) for d in folders for n in names]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
      raise MissingDataError(
        f"no GAIA metadata.jsonl for split {split!r} under {path}. {GAIA_HOWTO}"
      )
  folder_split = os.path.basename(os.path.dirname(found))
  if folder_split in GAIA_SPLITS and folder_split != split:
    raise ValueError(f"{found} is GAIA's {folder_split!r} split, not {split!r}: pass split=")
  return found


def _levels(level: int | Iterable[int] | None) -> tuple[int, ...]:
  levels = GAIA_LEVELS if level is None else (level,) if isinstance(level, int) else tuple(level)
  if bad := [x for x in levels if x not in GAIA_LEVELS]:
    raise ValueError(f"GAIA levels are {GAIA_LEVELS}, got {bad}")
  return levels


class AgentTask(BenchmarkTask):
  """A benchmark task whose answer format is its own (`instruction`), not a prompts.json kind."""

  kind = None

  def instruction(self, problem: Problem) -> str:
    raise NotImplementedError


class GAIATask(AgentTask):
  """GAIA (Mialon et al. 2023): questions for tool-using assistants, three levels.

  `load(path, split="validation", level=None)`: `path` as `GAIA_HOWTO` says; `split` is
  "validation" (the default: the split with public answers) or "test" (its answers are "?",
  loaded as "": such problems load, `score` refuses them); the keyword option `level` (1, 2,
  3 or several) keeps those levels; `limit` keeps the first problems in file order (`seed`
  is unused). Ids are GAIA's `task_id`s; meta: `family` ("level1".."level3"), `level`,
  `file_name` and `file_path` (absolute, checked to exist; "" when the task has no
  attachment), `annotator_metadata`.
  """

  name = "gaia"
  families = tuple(f"level{n}" for n in GAIA_LEVELS)

  def load(self, path=None, *, split="validation", limit=None, seed=0, level=None):
    del seed  # file order
    if split not in GAIA_SPLITS:
      raise ValueError(f"GAIA's splits are {GAIA_SPLITS}, got {split!r}")
    levels = _levels(level)
    metadata = _gaia_metadata(path, split)
    folder = os.path.dirname(metadata)
    records = [r for r in _read_records(metadata) if int(r["Level"]) in levels][:limit]
    problems = [_gaia_problem(r, folder) for r in records]
    if len({p.id for p in problems}) != len(problems):
      raise ValueError(f"{metadata} repeats task_ids")
    return problems

  def question_text(self, problem):
    name = problem.meta.get("file_name")
    return f"{problem.question}\n\nAttached file: {name}" if name else problem.question

  def instruction(self, problem):
    return GAIA_INSTRUCTION

  def score(self, completion, problem):
    if not problem.answer:
      raise ValueError(
        f"GAIA problem {problem.id!r} has no gold answer (the test split's are private: the"
        " leaderboard scores it)"
      )
    return float(gaia_match(answer_span(completion, "FINAL ANSWER"), problem.answer))


def _gaia_problem(record: dict[str, Any], folder: str) -> Problem:
  task_id, level = str(record["task_id"]), int(record["Level"])
  answer = str(record.get("Final answer") or "").strip()
  file_name = record.get("file_name") or ""
  file_path = os.path.join(folder, file_name) if file_name else ""
  if file_path and not os.path.isfile(file_path):
    raise FileNotFoundError(
      f"GAIA task {task_id}: its attached file {file_name} is missing from {folder}; copy the"
      " release's attached files beside its metadata.jsonl"
    )
  meta = {
    "family": f"level{level}",
    "level": level,
    "file_name": file_name,
    "file_path": file_path,
    "annotator_metadata": record.get("Annotator Metadata") or {},
  }
  return Problem(task_id, record["Question"], "" if answer == "?" else answer, meta)


# --- MARBLE database diagnosis -----------------------------------------------------------------

MARBLE_HOWTO = (
  "MARBLE's database tasks are in no package: clone https://github.com/ulab-uiuc/MARBLE and pass"
  " multiagentbench/database/database_main.jsonl, its folder, or the clone"
)
# The candidates of every task in MARBLE's database_main.jsonl (`task.labels`); used when a
# problem built by hand has none.
MARBLE_LABELS = (
  "INSERT_LARGE_DATA",
  "LOCK_CONTENTION",
  "VACUUM",
  "REDUNDANT_INDEX",
  "FETCH_LARGE_DATA",
)


def cause_label(text: str) -> str:
  """A root-cause label in MARBLE's spelling: "insert large-data" -> "INSERT_LARGE_DATA"."""
  return re.sub(r"[^A-Z0-9]+", "_", text.upper()).strip("_")


def predicted_causes(completion: str, candidates: Sequence[str], n: int) -> list[str]:
  """The first `n` distinct candidate labels the completion's answer names, in order.

  The answer is `answer_span(completion, "ROOT CAUSES")`; labels are matched whole after
  `cause_label` spelling, so case, spaces and hyphens do not matter.
  """
  text = f"_{cause_label(answer_span(completion, 'ROOT CAUSES'))}_"
  found = sorted((text.find(f"_{c}_"), c) for c in set(candidates) if f"_{c}_" in text)
  return [c for _, c in found][:n]


def _marble_file(path: str | None) -> str:
  if path is None:
    raise MissingDataError(f"marble_db has no default source. {MARBLE_HOWTO}")
  path = os.path.abspath(os.path.expanduser(path))
  candidates = (
    path,
    os.path.join(path, "database_main.jsonl"),
    os.path.join(path, "multiagentbench", "database", "database_main.jsonl"),
  )
  if found := next((c for c in candidates if os.path.isfile(c)), None):
    return found
  raise MissingDataError(f"no database_main.jsonl at {path}. {MARBLE_HOWTO}")


class MarbleDBTask(AgentTask):
  """MARBLE / MultiAgentBench's database scenario (Zhu et al. 2025): find a PostgreSQL
  anomaly's root causes.

  `load(path)` reads `database_main.jsonl` (`MARBLE_HOWTO`); it is one evaluation set, so
  `split` must be "test"; `limit` keeps the first tasks in file order (`seed` is unused).
  A record (upstream fields) is `task_id`, `scenario` ("database"), `task` {`content`,
  `output_format`, `labels` (the candidates), `root_causes` (gold), `number_of_labels_pred`
  (how many causes the agents may name)}, `environment` {`init_sql`, `anomalies`}, `agents`
  (their profiles), `relationships`. Ids are the `task_id`s; the question is the task's
  content and output format; the answer is the gold labels, `cause_label`-spelled, sorted and
  joined with ","; meta keeps `labels`, `num_predictions`, the environment setup
  (`init_sql`, `anomalies`), `agents` and `relationships` for the agent workflow, and
  `family` ("single_cause" or "multi_cause").

  Score: the fraction of gold root causes among the first `num_predictions` labels the
  answer names (`predicted_causes`), as MARBLE's `scripts/database/batch_eval.py` does
  (`sum(gold in predicted) / len(gold)`): with one gold cause and two guesses allowed, a hit
  is the gold cause among the two. Upstream has gpt-4o-mini extract the predicted causes from
  free text (always two); we read them from the answer line instead, deterministically, and
  allow as many as the task asks for, so naming every label cannot score. A task is
  `correct` when every gold cause is named; accuracy is the fraction correct
  (`marble_accuracy`).
  """

  name = "marble_db"
  families = ("single_cause", "multi_cause")

  def load(self, path=None, *, split="test", limit=None, seed=0):
    del seed  # file order
    if split != "test":
      raise ValueError(f"marble_db is one evaluation set: split must be 'test', got {split!r}")
    source = _marble_file(path)
    problems = [_marble_problem(r, source) for r in _read_records(source)][:limit]
    if len({p.id for p in problems}) != len(problems):
      raise ValueError(f"{source} repeats task_ids")
    return problems

  def instruction(self, problem):
    labels = problem.meta.get("labels") or MARBLE_LABELS
    n = problem.meta.get("num_predictions", len(problem.answer.split(",")))
    return (
      f"End with the line 'ROOT CAUSES: <cause>, ...' naming the {n} most likely root"
      f" causes, each one of: {', '.join(labels)}."
    )

  def score(self, completion, problem):
    gold = [g for g in problem.answer.split(",") if g]
    if not gold:
      raise ValueError(f"marble_db problem {problem.id!r} has no gold root causes")
    candidates = [*(problem.meta.get("labels") or MARBLE_LABELS), *gold]
    n = problem.meta.get("num_predictions", len(gold))
    predicted = predicted_causes(completion, candidates, n)
    return sum(g in predicted for g in gold) / len(gold)

  def correct(self, completion, problem) -> bool:
    """MARBLE's correctness: every gold root cause is among the causes named (score 1)."""
    return self.score(completion, problem) == 1.0


def marble_accuracy(scores: Iterable[float]) -> float:
  """The fraction of tasks answered correctly (score 1: every gold cause named), MARBLE's
  accuracy; the mean of the scores themselves is its partial credit."""
  scores = list(scores)
  return sum(s == 1.0 for s in scores) / len(scores) if scores else 0.0


def _marble_problem(record: dict[str, Any], source: str) -> Problem:
  if record.get("scenario", "database") != "database":
    raise ValueError(f"{source}: task {record.get('task_id')} is a {record['scenario']!r} task")
  task, env = record["task"], record.get("environment") or {}
  gold = sorted({cause_label(c) for c in task.get("root_causes") or ()})
  if not gold:
    raise ValueError(f"{source}: task {record['task_id']} has no root_causes")
  question = "\n\n".join(s.strip() for s in (task["content"], task.get("output_format", "")) if s)
  meta = {
    "family": "single_cause" if len(gold) == 1 else "multi_cause",
    "labels": [cause_label(c) for c in task.get("labels") or MARBLE_LABELS],
    "num_predictions": int(task.get("number_of_labels_pred") or len(gold)),
    "init_sql": env.get("init_sql", ""),
    "anomalies": env.get("anomalies", []),
    "agents": record.get("agents", []),
    "relationships": record.get("relationships", []),
  }
  return Problem(str(record["task_id"]), question, ",".join(gold), meta)


GAIA = GAIATask()
MARBLE_DB = MarbleDBTask()
