"""Training data must not contain the evaluation sets: ids and normalised-text checks.

`Contamination(benchmarks)` indexes every benchmark question (the harness's own tasks,
loaded from their packages): the hash of each question's normalised text, and every
13-word shingle of it (the n-gram decontamination of GPT-3's paper). `find(texts)`
names the benchmark problem a training text repeats: one of its normalised texts equal
to a question, or sharing a 13-word run with one. Questions shorter than 13 words are
matched by their whole normalised text only, as a substring would flag common phrases.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence

# Every benchmark the harness loads from a package (tasks/benchmark.py's sets).
BENCHMARKS = (
  "gsm8k",
  "aime2024",
  "aime2025",
  "math500",
  "gpqa_diamond",
  "medqa",
  "mmlu",
  "humaneval",
  "mbpp",
)
NGRAM = 13


def normalize(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+", text.lower())


def _hash(words: Sequence[str]) -> int:
  return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest())


def _shingles(words: Sequence[str]) -> Iterable[int]:
  for i in range(len(words) - NGRAM + 1):
    yield _hash(words[i : i + NGRAM])


def load_benchmarks(names: Sequence[str] = BENCHMARKS) -> dict[str, list[tuple[str, str]]]:
  """{benchmark: [(problem id, question)]} for every split the harness evaluates on.

  Raises `psynth_jax.tasks.benchmark.MissingDataError` naming the install line when a
  benchmark's package is missing: a check that skipped a set would prove nothing.
  """
  from psynth_jax import tasks

  return {name: [(p.id, p.question) for p in tasks.get(name).load()] for name in names}


class Contamination:
  def __init__(self, benchmarks: Mapping[str, Sequence[tuple[str, str]]]):
    self.names = sorted(benchmarks)
    self.exact: dict[int, str] = {}
    self.ngrams: dict[int, str] = {}
    self.ids: dict[str, str] = {}
    for name, problems in benchmarks.items():
      for pid, question in problems:
        where = f"{name}:{pid}"
        self.ids[str(pid)] = where
        words = normalize(question)
        if words:
          self.exact[_hash(words)] = where
        for h in _shingles(words):
          self.ngrams.setdefault(h, where)

  def find(self, problem_id: str, texts: Iterable[str]) -> str | None:
    """ "<benchmark>:<id> (<how>)" of the first benchmark problem these texts repeat, or None."""
    if problem_id in self.ids:
      return f"{self.ids[problem_id]} (same id)"
    for text in texts:
      words = normalize(text)
      if words and (hit := self.exact.get(_hash(words))):
        return f"{hit} (same text)"
      for h in _shingles(words):
        if hit := self.ngrams.get(h):
          return f"{hit} ({NGRAM}-word overlap)"
    return None
