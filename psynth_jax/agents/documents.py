"""A local document collection an agent can search (BM25) and read, and its two tools.

  corpus = Corpus([Document("korvessa-cooperative", "Korvessa Cooperative", "The ..."), ...])
  corpus.search("who founded Korvessa", k=3)     # [(Document, score), ...], best first
  box = Toolbox([search_tool(corpus), visit_tool(corpus)])
  box.call("search", {"query": "Korvessa founder"}).text
  box.call("visit", {"doc_id": "korvessa-cooperative"}).text

Ranking is Okapi BM25 (Lucene's variant) from `bm25s`, over each document's title (counted
twice: a field boost, so that a short page mentioning a name twice does not outrank the
page of that name) and text: lowercased words of two or more letters or digits, English stop words dropped, no
stemming. A document with no query word scores 0 and is never returned, so a search can
come back empty ("No document matches ..."), which is an answer, not an error.

`search` shows, per hit, its id, title, score and a snippet: the text from the sentence
that shares most words with the query on. `visit` shows a whole document, found by its id or
its exact title (case ignored); an unknown one is an error observation that names the
closest ids. Collections load from a JSON-lines file ({"id", "title", "text"} per line) or
a folder of .txt / .md files (id: the path without its suffix; title: the first line).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Iterable, Sequence

from psynth_jax.agents.tools import Tool

TOKEN = r"(?u)\b\w\w+\b"  # bm25s's default: words of two or more characters
SEARCH_CHARS = 2500  # a search's output: k hits of a snippet each
VISIT_CHARS = 6000  # one document
SNIPPET_CHARS = 280
MAX_K = 10


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  title: str
  text: str

  def render(self) -> str:
    return f"# {self.title}\n\n{self.text}"


class Corpus:
  """Documents with unique ids and a BM25 index over their title and text."""

  def __init__(self, documents: Iterable[Document]):
    import bm25s  # the `bench` extra

    self.documents = list(documents)
    if not self.documents:
      raise ValueError("a corpus needs at least one document")
    self._by_id = {d.id: d for d in self.documents}
    if len(self._by_id) != len(self.documents):
      seen = [d.id for d in self.documents]
      raise ValueError(f"document ids repeat: {sorted({i for i in seen if seen.count(i) > 1})}")
    self._by_title = {d.title.casefold(): d for d in self.documents}
    texts = [f"{d.title}\n{d.title}\n{d.text}" for d in self.documents]  # the title counts twice
    tokens = bm25s.tokenize(texts, token_pattern=TOKEN, stopwords="en", show_progress=False)
    self._index = bm25s.BM25()  # k1 = 1.5, b = 0.75, Lucene's idf
    self._index.index(tokens, show_progress=False)
    self._bm25s = bm25s

  def __len__(self) -> int:
    return len(self.documents)

  def get(self, key: str) -> Document:
    """The document with id `key`, else the one titled `key` (case ignored)."""
    if (doc := self._by_id.get(key.strip())) or (doc := self._by_title.get(key.strip().casefold())):
      return doc
    close = difflib.get_close_matches(key.strip(), list(self._by_id), n=3, cutoff=0.5)
    hint = f"; closest ids: {', '.join(close)}" if close else "; search first to find an id"
    raise LookupError(f"no document {key!r} in the collection{hint}")

  def search(self, query: str, k: int = 5) -> list[tuple[Document, float]]:
    """The (at most) k best documents for `query` with a positive BM25 score, best first."""
    words = self._bm25s.tokenize(
      [query], token_pattern=TOKEN, stopwords="en", return_ids=False, show_progress=False
    )
    if not words[0]:
      return []
    found, scores = self._index.retrieve(words, k=min(k, len(self)), show_progress=False)
    hits = [(self.documents[int(i)], float(s)) for i, s in zip(found[0], scores[0], strict=True)]
    return [(d, s) for d, s in hits if s > 0]

  @classmethod
  def from_jsonl(cls, path: str) -> Corpus:
    with open(path, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f if line.strip()]
    return cls(Document(str(r["id"]), r.get("title") or str(r["id"]), r["text"]) for r in rows)

  @classmethod
  def from_folder(cls, folder: str) -> Corpus:
    documents = []
    for base, _, names in sorted(os.walk(folder)):
      for name in sorted(names):
        if not name.endswith((".txt", ".md")):
          continue
        path = os.path.join(base, name)
        with open(path, encoding="utf-8", errors="replace") as f:
          text = f.read().strip()
        title, _, body = text.partition("\n")
        doc_id = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
        documents.append(Document(doc_id, title.lstrip("# ").strip() or doc_id, body.strip()))
    return cls(documents)

  def to_jsonl(self, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
      for d in self.documents:
        f.write(json.dumps(dataclasses.asdict(d), ensure_ascii=False) + "\n")


def snippet(text: str, query: str, chars: int = SNIPPET_CHARS) -> str:
  """The sentence sharing most words with `query` (the first on ties), and those after it,
  up to `chars` characters."""
  sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]
  if not sentences:
    return ""
  wanted = {w.lower() for w in re.findall(TOKEN, query)}
  overlap = [len(wanted & {w.lower() for w in re.findall(TOKEN, s)}) for s in sentences]
  best = overlap.index(max(overlap))
  out = " ".join(s.strip() for s in sentences[best:])
  return out if len(out) <= chars else out[: chars - 3].rstrip() + "..."


def format_hits(hits: Sequence[tuple[Document, float]], query: str) -> str:
  if not hits:
    return f"No document matches {query!r}."
  lines = []
  for n, (doc, score) in enumerate(hits, 1):
    lines.append(f"{n}. [{doc.id}] {doc.title} (score {score:.2f})\n   {snippet(doc.text, query)}")
  return "\n".join(lines)


def search_tool(corpus: Corpus, *, max_chars: int = SEARCH_CHARS) -> Tool:
  def search(query: str, k: int = 5) -> str:
    if not 1 <= k <= MAX_K:
      raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    return format_hits(corpus.search(query, k), query)

  return Tool(
    "search",
    f"Searches the local document collection ({len(corpus)} documents) by keywords; returns"
    " the best matches with their ids and a snippet. Read a whole one with visit.",
    {"query": str, "k": int},
    search,
    required=("query",),
    descriptions={"query": "keywords", "k": f"how many results, 1 to {MAX_K} (default 5)"},
    max_chars=max_chars,
  )


def visit_tool(corpus: Corpus, *, max_chars: int = VISIT_CHARS) -> Tool:
  def visit(doc_id: str) -> str:
    return corpus.get(doc_id).render()

  return Tool(
    "visit",
    "Reads one document of the local collection in full, by the id a search gave.",
    {"doc_id": str},
    visit,
    descriptions={"doc_id": "a document id from search results (or its exact title)"},
    max_chars=max_chars,
  )
