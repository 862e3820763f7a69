"""Stage-1 route "retrieved chunks": each retrieved paragraph is one branch, the target names
the supporting one and answers (the paper's 2WikiMultihopQA route).

Default source: ChatRAG-Bench's doc2dial retrieval set as NVIDIA's lm-eval ships it
(`nvidia-lm-eval==26.3`, installed by `psynth data install` into the psynth cache):
`tasks/chatrag_bench/dataset/nvidia_dragon_multiturn_retrieved.jsonl` (3,939
conversation turns, each with the ids of its top-5 retrieved chunks `ctxs`, the gold
chunk's id `ground_truth_ctx` and the reference `answers`) and `documents.json`
(chunk texts by document). A local copy of those two files in the same format can be
given as the folder that holds them.

Each turn is one problem: the conversation so far is the question (consecutive turns of
one role joined, as ChatRAG's own loader does), the 5 retrieved chunks in retrieval order
are the branches ("[Chunk i] <text>"), and the target is "Supporting chunk: i" and the
first reference answer. A turn whose gold chunk was not retrieved is skipped (the target
could name no chunk), as is one without an answer.
"""

from __future__ import annotations

import hashlib
import json
import os

from psynth_jax.tasks import benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.routes import Report, RouteTask

FOLDER = ("lm_eval", "tasks/chatrag_bench/dataset")
RETRIEVED = "nvidia_dragon_multiturn_retrieved.jsonl"
DOCUMENTS = "documents.json"
ROWS = 3_939


def conversation_text(messages: list[dict]) -> str:
  """ "User: ...\\nAssistant: ..." with consecutive turns of one role joined."""
  turns: list[list[str]] = []
  for m in messages:
    role = "User" if m["role"] == "user" else "Assistant"
    if turns and turns[-1][0] == role:
      turns[-1][1] += " " + m["content"].strip()
    else:
      turns.append([role, m["content"].strip()])
  return "\n".join(f"{role}: {text}" for role, text in turns)


def _digest(text: str) -> str:
  return hashlib.sha256(text.strip().encode()).hexdigest()[:16]


class RetrievedChunksTask(RouteTask):
  name = "retrieved_chunks"
  context_line = "You are given latent information: paragraphs retrieved for this conversation."
  instruction = (
    "Name the paragraph that supports the answer as 'Supporting chunk: <number>', then"
    " answer the user's last message."
  )

  def read(self, path=None):
    folder = path or benchmark.package_file(*FOLDER)
    rows_path, docs_path = (os.path.join(folder, n) for n in (RETRIEVED, DOCUMENTS))
    for p in (rows_path, docs_path):
      if not os.path.exists(p):
        raise FileNotFoundError(
          f"{p} is missing: a retrieval folder holds {RETRIEVED} and {DOCUMENTS}"
        )
    with open(rows_path, encoding="utf-8") as f:
      rows = json.load(f)  # a JSON array despite the .jsonl name
    with open(docs_path, encoding="utf-8") as f:
      documents = json.load(f)
    if path is None and len(rows) != ROWS:
      raise ValueError(f"{rows_path}: {len(rows)} rows, expected {ROWS}")
    report = Report()
    problems = []
    for index, row in enumerate(rows):
      report.rows += 1
      problem = self._problem(row, index, documents, report)
      if problem is not None:
        problems.append(problem)
    return problems, report

  @staticmethod
  def _problem(row, index, documents, report) -> Problem | None:
    try:
      chunks = documents[row["document"]]
      ctxs, gold = [int(c) for c in row["ctxs"]], int(row["ground_truth_ctx"])
      texts = [chunks[c] for c in ctxs]
    except (KeyError, IndexError, TypeError, ValueError):
      report.skip("malformed row (document, ctxs or ground_truth_ctx)")
      return None
    answers = [a for a in row.get("answers", []) if isinstance(a, str) and a.strip()]
    if not answers:
      report.skip("no reference answer")
      return None
    if gold not in ctxs:
      report.skip("gold chunk not among the retrieved")
      return None
    branches = [f"[Chunk {i + 1}] {text.strip()}" for i, text in enumerate(texts)]
    target = f"Supporting chunk: {ctxs.index(gold) + 1}\n{answers[0].strip()}"
    meta = {
      "branches": branches,
      "document": row["document"],
      "gold_chunk": ctxs.index(gold) + 1,
      # A conversation's turns (rows that open with the same message) share their chunks
      # and earlier answers: one split. (`document` is the domain: va, dmv, ssa, studentaid.)
      "group": f"{row['document']}/{_digest(row['messages'][0]['content'])}",
    }
    return Problem(f"{row['document']}-{index}", conversation_text(row["messages"]), target, meta)


RETRIEVED_CHUNKS = RetrievedChunksTask()
