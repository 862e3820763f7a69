"""The local document collection: BM25 search ranks the right page first, visit reads one,
errors and misses are observations."""

import json

import pytest

from psynth_jax.agents import documents
from psynth_jax.agents.documents import Corpus, Document
from psynth_jax.agents.tools import Toolbox

DOCS = [
  Document("red-fox", "Red fox", "The red fox is a small canid. It hunts voles at dusk."),
  Document("arctic-fox", "Arctic fox", "The arctic fox lives in the tundra. Its fur turns white."),
  Document("otter", "Eurasian otter", "The otter swims in rivers and eats fish. Otters are shy."),
  Document("tundra", "Tundra", "The tundra is a treeless plain. Foxes, hares and owls live there."),
  Document("vole", "Field vole", "A field vole is prey for owls and foxes."),
]


@pytest.fixture(scope="module")
def corpus():
  return Corpus(DOCS)


@pytest.fixture(scope="module")
def box(corpus):
  return Toolbox([documents.search_tool(corpus), documents.visit_tool(corpus)])


def test_search_ranks_the_right_document_first(corpus):
  for query, best in (
    ("red fox", "red-fox"),
    ("which fox lives in the tundra with white fur", "arctic-fox"),
    ("otter fish rivers", "otter"),
    ("treeless plain", "tundra"),
    ("Eurasian otter", "otter"),  # a title
  ):
    hits = corpus.search(query, k=3)
    assert hits[0][0].id == best, (query, hits)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
  assert len(corpus.search("fox", k=2)) == 2
  assert corpus.search("the and of", k=3) == []  # stop words only
  assert corpus.search("zebra", k=3) == []  # no word of the collection


def test_search_tool_shows_ids_titles_and_the_matching_sentence(box):
  obs = box.call("search", {"query": "what does the arctic fox fur do", "k": 2})
  assert not obs.error and obs.text.startswith("1. [arctic-fox] Arctic fox (score ")
  assert "Its fur turns white." in obs.text.splitlines()[1]
  assert obs.text.count("\n") == 3  # two hits, a snippet line each
  miss = box.call("search", {"query": "zebra"})
  assert not miss.error and miss.text == "No document matches 'zebra'."
  for k in (0, 11):
    bad = box.call("search", {"query": "fox", "k": k})
    assert bad.error and "k must be between 1 and 10" in bad.text
  assert box.call("search", {"k": 2}).error  # the query is required


def test_snippet_starts_at_the_best_sentence_and_is_bounded():
  text = "Alpha beta. Gamma delta epsilon. Zeta eta."
  assert documents.snippet(text, "delta epsilon") == "Gamma delta epsilon. Zeta eta."
  assert documents.snippet(text, "nothing here") == text  # no overlap: from the start
  long = documents.snippet("word " * 200, "word", chars=50)
  assert len(long) == 50 and long.endswith("...")


def test_visit_reads_a_document_by_id_or_title_and_a_miss_is_an_error(box):
  obs = box.call("visit", {"doc_id": "otter"})
  assert not obs.error and obs.text == "# Eurasian otter\n\n" + DOCS[2].text
  assert box.call("visit", {"doc_id": "eurasian OTTER"}).text == obs.text
  miss = box.call("visit", {"doc_id": "red-fxo"})
  assert miss.error and "no document 'red-fxo'" in miss.text and "red-fox" in miss.text
  assert box.call("visit", {"doc_id": 3}).error  # mistyped


def test_a_long_document_is_cut_and_the_cut_recorded():
  corpus = Corpus([Document("long", "Long", "text " * 5000)])
  obs = documents.visit_tool(corpus, max_chars=1000)({"doc_id": "long"})
  assert obs.truncated and obs.full_chars == len("# Long\n\n" + "text " * 5000)
  assert len(obs.text) < 1100


def test_corpus_checks_its_documents_and_loads_from_files(tmp_path, corpus):
  with pytest.raises(ValueError, match="at least one"):
    Corpus([])
  with pytest.raises(ValueError, match="repeat"):
    Corpus([DOCS[0], DOCS[0]])
  path = tmp_path / "docs.jsonl"
  corpus.to_jsonl(str(path))
  assert Corpus.from_jsonl(str(path)).documents == DOCS
  assert json.loads(path.read_text().splitlines()[0])["id"] == "red-fox"
  (tmp_path / "pages" / "animals").mkdir(parents=True)
  (tmp_path / "pages" / "animals" / "owl.md").write_text(
    "# Snowy owl\n\nA white owl of the tundra."
  )
  (tmp_path / "pages" / "hare.txt").write_text("Mountain hare\nIts coat turns white in winter.")
  (tmp_path / "pages" / "skip.bin").write_bytes(b"\0")
  folder = Corpus.from_folder(str(tmp_path / "pages"))
  assert [(d.id, d.title) for d in folder.documents] == [
    ("hare", "Mountain hare"),
    ("animals/owl", "Snowy owl"),
  ]
  assert folder.search("white owl", k=1)[0][0].id == "animals/owl"
