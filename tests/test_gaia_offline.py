"""gaia_offline: a seeded, deterministic set whose every gold answer is recomputed here from
the episode's documents and attached file alone, read another way; GAIA's scorer."""

import csv
import os
import re

import pytest

from psynth_jax import tasks
from psynth_jax.tasks import agents, gaia_offline
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.gaia_offline import GAIA_OFFLINE

GAIA_VAL = os.path.join(
  os.path.dirname(__file__), "fixtures", "bench", "gaia", "2023", "validation"
)


@pytest.fixture(scope="module")
def problems():
  return GAIA_OFFLINE.load()


def test_the_set_is_registered_balanced_and_deterministic(problems):
  assert tasks.get("gaia_offline") is GAIA_OFFLINE and "gaia_offline" in tasks.names()
  assert len(problems) == 60 and len({p.id for p in problems}) == 60
  assert [p.family for p in problems[:6]] == ["level1", "level2", "level3"] * 2
  for level in (1, 2, 3):
    chosen = [p for p in problems if p.meta["level"] == level]
    assert len(chosen) == 20
    assert {p.meta["variant"] for p in chosen} == set(gaia_offline.VARIANTS[level])
    assert all(len(p.meta["steps"]) == {1: 1, 2: 3, 3: 4}[level] for p in chosen)
  formats = {os.path.splitext(p.meta["file_name"])[1] for p in problems if p.meta["file_name"]}
  assert formats == {".csv", ".xlsx", ".docx", ".pdf"}
  assert [p.to_json() for p in GAIA_OFFLINE.load()] == [p.to_json() for p in problems]
  assert [Problem.from_json(p.to_json()) for p in problems] == problems
  other = GAIA_OFFLINE.load(seed=1, limit=10)
  assert [p.question for p in other] != [p.question for p in problems[:10]]
  validation = GAIA_OFFLINE.load(split="validation")
  assert len(validation) == 30 and not {p.question for p in validation} & {
    p.question for p in problems
  }
  assert [p.id for p in GAIA_OFFLINE.load(level=2, limit=3)] == [
    p.id for p in problems if p.meta["level"] == 2
  ][:3]
  assert len(GAIA_OFFLINE.load(size=90)) == 90
  assert GAIA_OFFLINE.load(size=90)[:60] == problems  # a bigger set extends the default one
  with pytest.raises(ValueError, match="splits"):
    GAIA_OFFLINE.load(split="train")
  with pytest.raises(ValueError, match="reads no file"):
    GAIA_OFFLINE.load("somewhere")


# --- the independent path: question text + documents (via visit) + the file's own library ----


def _doc(box, title):
  """A document's text as visit shows it, after checking a search for it ranks it first."""
  hits = box.call("search", {"query": title, "k": 3}).text
  assert re.match(rf"1\. \[[\w-]+\] {re.escape(title)} \(", hits), (title, hits)
  obs = box.call("visit", {"doc_id": title})
  assert not obs.error and not obs.truncated
  return obs.text


def _one(pattern, text):
  (found,) = re.findall(pattern, text)  # exactly one: the fact is unambiguous
  return found


def _organisations(box):
  """The titles of every organisation's page: the only pages that say "headquartered"."""
  text = box.call("search", {"query": "headquartered", "k": 10}).text
  titles = re.findall(r"\] (.+) \(score", text)
  assert 2 <= len(titles) < 10  # none left out
  return titles


def _ledger(path):
  """[(date, code, quantity, unit_price)] read straight from the file by its own library."""
  suffix = os.path.splitext(path)[1]
  if suffix == ".csv":
    with open(path, newline="") as f:
      rows = list(csv.reader(f))
  elif suffix == ".xlsx":
    import openpyxl

    rows = list(openpyxl.load_workbook(path).active.iter_rows(values_only=True))
  elif suffix == ".docx":
    import docx

    (table,) = docx.Document(path).tables
    rows = [[c.text for c in row.cells] for row in table.rows]
  else:
    import pypdf

    lines = "\n".join(p.extract_text() for p in pypdf.PdfReader(path).pages).splitlines()
    rows = [line.split(" | ") for line in lines if line.count(" | ") == 3]
  assert list(rows[0]) == ["date", "product_code", "quantity", "unit_price"]
  return [(str(d), str(c), int(q), int(p)) for d, c, q, p in rows[1:]]


def _code(box, org):
  return _one(r"under the product code ([A-Z]{2}-\d{4})\.", _doc(box, org))


def _units(rows, code, year=""):
  return sum(q for d, c, q, _ in rows if c == code and d.startswith(year))


def _recompute(problem, box, workdir):
  q, variant = problem.question, problem.meta["variant"]
  org = re.search(r"the ([A-Z]\w+ [A-Z]\w+)(?: founded| headquartered| ship| in the| is|,)", q)
  rows = _ledger(os.path.join(workdir, problem.meta["file_name"])) if "ledger" in q else None
  if variant == "founded":
    return _one(r"It was founded in (\d{4}) by", _doc(box, org.group(1)))
  if variant == "headquarters":
    return _one(r"headquartered in (\w+)\.", _doc(box, org.group(1)))
  if variant == "founder":
    return _one(r"founded in \d{4} by (\w+ \w+)\.", _doc(box, org.group(1)))
  if variant == "population":
    town = _one(r"population of (\w+),", q)
    return _one(r"population of ([\d,]+)\.", _doc(box, town)).replace(",", "")
  if variant == "lookup":
    code, date = _one(r"product ([A-Z]{2}-\d{4}) were shipped on ([\d-]+)\?", q)
    (quantity,) = [n for d, c, n, _ in rows if (d, c) == (date, code)]
    return quantity
  if variant in ("total", "revenue", "range"):
    code = _code(box, org.group(1))
    mine = [(n, p) for _, c, n, p in rows if c == code]
    if variant == "total":
      return sum(n for n, _ in mine)
    if variant == "revenue":
      return sum(n * p for n, p in mine)
    return max(n for n, _ in mine) - min(n for n, _ in mine)
  titles = _organisations(box)
  if variant == "founder_directs":
    founder = _one(r"founded in \d{4} by (\w+ \w+)\.", _doc(box, org.group(1)))
    (other,) = [t for t in titles if f"Its director is {founder}." in _doc(box, t)]
    return _units(rows, _code(box, other), _one(r"ship in (\d{4})", q))
  if variant == "birthplace_hq":
    person = _one(r"where (\w+ \w+) was born", q)
    town = _one(r"was born in \d{4} in (\w+)\.", _doc(box, person))
    (other,) = [t for t in titles if f"headquartered in {town}." in _doc(box, t)]
    code = _code(box, other)
    return sum(n * p for _, c, n, p in rows if c == code)
  assert variant == "director_founded"
  first = org.group(1)
  director = _one(r"Its director is (\w+ \w+)\.", _doc(box, first))
  (other,) = [t for t in titles if re.search(rf"founded in \d{{4}} by {director}\.", _doc(box, t))]
  assert other != first
  return abs(_units(rows, _code(box, first)) - _units(rows, _code(box, other)))


def test_every_gold_answer_follows_from_the_documents_and_the_file(problems, tmp_path):
  for problem in problems:
    workdir = str(tmp_path / problem.id)
    box = GAIA_OFFLINE.toolbox(problem, workdir)
    assert box.names() == ["search", "visit", "parse_file", "python"]
    name = problem.meta["file_name"]
    assert os.listdir(workdir) == ([name] if name else [])
    answer = str(_recompute(problem, box, workdir))
    assert answer == problem.answer, (problem.id, problem.meta["variant"], answer)
    assert GAIA_OFFLINE.score(f"...\nFINAL ANSWER: {answer}", problem) == 1.0
    if name:  # what the agent reads has every row the answer needs
      parsed = box.call("parse_file", {"path": name})
      assert not parsed.error and not parsed.truncated
      assert parsed.text.count(" | ") >= 3 * (1 + len(_ledger(os.path.join(workdir, name))))


def test_an_episode_is_rebuilt_the_same_from_meta_alone(problems, tmp_path):
  problem = next(p for p in problems if p.meta["file_name"].endswith(".pdf"))
  texts = []
  for n in range(2):
    box = gaia_offline.toolbox(Problem.from_json(problem.to_json()), str(tmp_path / str(n)))
    texts.append(
      (
        box.call("parse_file", {"path": problem.meta["file_name"]}).text,
        box.call("search", {"query": problem.question, "k": 10}).text,
      )
    )
  assert texts[0] == texts[1]
  stale = Problem(problem.id, problem.question, problem.answer, {**problem.meta, "generator": 0})
  with pytest.raises(ValueError, match="regenerate"):
    gaia_offline.toolbox(stale, str(tmp_path / "stale"))


def test_python_in_an_episode_reads_the_attached_file(problems, tmp_path):
  problem = next(p for p in problems if p.meta["file_name"].endswith(".csv"))
  box = GAIA_OFFLINE.toolbox(problem, str(tmp_path))
  code = f"import csv\nprint(len(list(csv.reader(open({problem.meta['file_name']!r})))))"
  rows = _ledger(os.path.join(tmp_path, problem.meta["file_name"]))
  assert box.call("python", {"code": code}).text == str(len(rows) + 1)


def test_gaia_proper_gets_its_attachment_and_file_tools(tmp_path):
  with_file, without = agents.GAIA.load(GAIA_VAL)[:2]
  box = gaia_offline.toolbox(with_file, str(tmp_path / "a"))
  assert box.names() == ["parse_file", "python"]
  assert os.listdir(tmp_path / "a") == [with_file.meta["file_name"]]
  assert not box.call("parse_file", {"path": with_file.meta["file_name"]}).error
  from psynth_jax.agents.documents import Corpus, Document

  corpus = Corpus([Document("d", "D", "some text")])
  box = gaia_offline.toolbox(without, str(tmp_path / "b"), corpus=corpus)
  assert box.names() == ["search", "visit", "parse_file", "python"]


def test_prompts_are_gaias_and_the_scorer_is_its_normalised_exact_match(problems):
  level2 = problems[1]
  prompt = GAIA_OFFLINE.single_agent_prompt(level2)
  assert level2.question in prompt and agents.GAIA_INSTRUCTION in prompt
  assert prompt.count(f"Attached file: {level2.meta['file_name']}") == 1
  assert "Attached file" not in GAIA_OFFLINE.single_agent_prompt(problems[0])
  assert len(GAIA_OFFLINE.worker_prompts(level2, 3)) == 3
  with pytest.raises(NotImplementedError):
    GAIA_OFFLINE.target(level2)

  def score(completion, gold):
    return GAIA_OFFLINE.score(completion, Problem("x", "q", gold, {"family": "level1"}))

  assert score("I added them.\nFINAL ANSWER: 1,234", "1234") == 1.0
  assert score("FINAL ANSWER: $1234", "1234") == 1.0
  assert score("FINAL ANSWER: 1234 units", "1234") == 0.0  # GAIA: a unit is no number
  assert score("FINAL ANSWER: 1235", "1234") == 0.0
  assert score("FINAL ANSWER: **ilsa  varrow.**", "Ilsa Varrow") == 1.0
  assert score("FINAL ANSWER: Ilsa Varow", "Ilsa Varrow") == 0.0
  assert score("The town is\nTarnwick", "Tarnwick") == 1.0  # no marker: the last line
  assert score("FINAL ANSWER: 3, Tarnwick", "3, tarnwick") == 1.0
  assert score("FINAL ANSWER: 3", "3, tarnwick") == 0.0
