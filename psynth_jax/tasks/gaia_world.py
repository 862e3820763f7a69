"""The made-up worlds of `gaia_offline`: towns, people, organisations, their documents, a ledger.

A `World` is drawn from a `random.Random`: `NUM_TOWNS` towns, `NUM_PEOPLE` people and
`NUM_ORGS` organisations, every name an invented word (two or three syllables, unique in
its world), so that no fact about them can be known without reading its document. Each
entity has one document (`World.documents`); its facts are stated in fixed sentences:

  organisation: "The <org> is a <what> headquartered in <town>. It was founded in <year>
    by <person>. Its director is <person>. The <org> trades its goods under the product
    code <XY-1234>. It employs <n> people. In <year> the <kind> moved into ..."
  person: "<name> was born in <year> in <town>." and "<last> founded the <org> in
    <year>." / "<last> is the director of the <org>." (or where they work)
  town: "<town> is a town on the <river> river with a population of <n,nnn>. It is
    home to the <org>. ... People born in <town> include <names>."

A ledger (`ledger`) lists shipments (date, product code, quantity, unit price) of some
organisations; `write_ledger` writes it as csv, xlsx (openpyxl), docx (python-docx) or
pdf (fpdf2, one row a line, cells joined by " | ").
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import random

from psynth_jax.agents import files
from psynth_jax.agents.documents import Corpus, Document

FORMATS = ("csv", "xlsx", "docx", "pdf")
LEDGER_HEADER = ("date", "product_code", "quantity", "unit_price")
NUM_TOWNS, NUM_PEOPLE, NUM_ORGS = 10, 12, 8
_DAYS = [datetime.date(2021, 1, 1) + datetime.timedelta(days=n) for n in range(3 * 365)]
_FIXED_TIME = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)

_ONSETS = "b br c d dr f g gr h k kr l m n p pr r s st t tr v w z th sh".split()
_VOWELS = "a e i o u ae ia ou".split()
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "nd", "rk", "x"]
_KINDS = {  # an organisation's kind -> what it is
  "Foundry": "metal foundry", "Cooperative": "farming cooperative", "Mill": "textile mill",
  "Works": "glass works", "Brewery": "brewery", "Press": "printing press",
  "Institute": "research institute", "Shipyard": "shipyard", "Guild": "craft guild",
  "Company": "trading company",
}  # fmt: skip
_JOBS = ("teacher", "surveyor", "engineer", "archivist", "physician", "carpenter", "chemist")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


@dataclasses.dataclass(frozen=True)
class Town:
  name: str
  population: int
  river: str
  market_day: str


@dataclasses.dataclass(frozen=True)
class Person:
  first: str
  last: str
  born: int
  birthplace: str
  job: str
  workplace: str  # a town

  @property
  def name(self) -> str:
    return f"{self.first} {self.last}"


@dataclasses.dataclass(frozen=True)
class Org:
  name: str  # "Korvessa Foundry"
  kind: str
  town: str  # headquarters; one organisation per town at most
  founder: str  # a person's full name
  director: str
  founded: int
  code: str  # product code, e.g. "KF-4821"
  staff: int
  moved: int  # the year it moved into its building (a distractor year)


@dataclasses.dataclass(frozen=True)
class Shipment:
  date: str
  code: str
  quantity: int
  unit_price: int

  def row(self) -> tuple:
    return (self.date, self.code, self.quantity, self.unit_price)


class World:
  """Towns, people and organisations with unique invented names, drawn from `rng`.

  Each organisation has a founder and a director (two people; nobody founds or directs two),
  and at least four people found one organisation and direct another, so chains exist.
  """

  def __init__(self, rng: random.Random):
    used: set[str] = set()
    self.towns = [
      Town(_name(rng, used), rng.randint(1_200, 480_000), _name(rng, used), rng.choice(_WEEKDAYS))
      for _ in range(NUM_TOWNS)
    ]
    town_names = [t.name for t in self.towns]
    firsts = [_name(rng, used) for _ in range(NUM_PEOPLE)]
    self.people = [
      Person(first, _name(rng, used), rng.randint(1940, 1975), rng.choice(town_names),
             rng.choice(_JOBS), rng.choice(town_names))
      for first in firsts
    ]  # fmt: skip
    names = [p.name for p in self.people]
    founders = rng.sample(names, NUM_ORGS)
    while True:  # directors: other people than the founder of the same organisation
      directors = rng.sample(names, NUM_ORGS)
      if all(f != d for f, d in zip(founders, directors, strict=True)):
        break
    born = {p.name: p.born for p in self.people}
    codes: set[str] = set()
    self.orgs = []
    for town, founder, director, kind in zip(
      rng.sample(town_names, NUM_ORGS),
      founders,
      directors,
      rng.sample(sorted(_KINDS), NUM_ORGS),
      strict=True,
    ):
      base = _name(rng, used)
      founded = rng.randint(born[founder] + 25, 2015)
      code = f"{base[0]}{kind[0]}-{rng.randint(1000, 9999)}"
      while code in codes:
        code = f"{base[0]}{kind[0]}-{rng.randint(1000, 9999)}"
      codes.add(code)
      self.orgs.append(Org(f"{base} {kind}", kind, town, founder, director, founded, code,
                           rng.randint(20, 4000), rng.randint(founded + 1, 2020)))  # fmt: skip

  def org(self, **where) -> Org:
    """The one organisation whose fields equal `where`."""
    (found,) = [o for o in self.orgs if all(getattr(o, k) == v for k, v in where.items())]
    return found

  def documents(self) -> list[Document]:
    docs = [_org_doc(o) for o in self.orgs]
    docs += [_person_doc(p, self.orgs) for p in self.people]
    docs += [_town_doc(t, self.orgs, self.people) for t in self.towns]
    return sorted(docs, key=lambda d: d.id)

  def corpus(self) -> Corpus:
    return Corpus(self.documents())


def _name(rng: random.Random, used: set[str]) -> str:
  """A new invented word of two or three syllables."""
  while True:
    word = "".join(
      rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
      for _ in range(rng.randint(2, 3))
    ).capitalize()
    if 5 <= len(word) <= 11 and word.lower() not in used:
      used.add(word.lower())
      return word


def _a(noun: str) -> str:
  return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _slug(text: str) -> str:
  return "-".join(text.lower().split())


def _org_doc(o: Org) -> Document:
  short = o.kind.lower()
  text = (
    f"The {o.name} is a {_KINDS[o.kind]} headquartered in {o.town}. It was founded in"
    f" {o.founded} by {o.founder}. Its director is {o.director}. The {o.name} trades its goods"
    f" under the product code {o.code}. It employs {o.staff} people. In {o.moved} the {short}"
    f" moved into its present building in {o.town}. The {short} publishes an annual report"
    " every spring."
  )
  return Document(_slug(o.name), o.name, text)


def _person_doc(p: Person, orgs: list[Org]) -> Document:
  text = f"{p.name} was born in {p.born} in {p.birthplace}."
  roles = []
  for o in orgs:
    if o.founder == p.name:
      roles.append(f"{p.last} founded the {o.name} in {o.founded}.")
    if o.director == p.name:
      roles.append(f"{p.last} is the director of the {o.name}.")
  text += " " + " ".join(roles or [f"{p.last} works as {_a(p.job)} in {p.workplace}."])
  text += f" {p.last} trained as {_a(p.job)}."
  return Document(_slug(p.name), p.name, text)


def _town_doc(t: Town, orgs: list[Org], people: list[Person]) -> Document:
  text = f"{t.name} is a town on the {t.river} river with a population of {t.population:,}."
  hosted = [o.name for o in orgs if o.town == t.name]
  text += f" It is home to the {hosted[0]}." if hosted else " No large organisation is based there."
  text += f" Its market is held every {t.market_day}."
  if natives := [p.name for p in people if p.birthplace == t.name]:
    text += f" People born in {t.name} include {', '.join(natives)}."
  return Document(_slug(t.name), t.name, text)


def ledger(rng: random.Random, world: World, needed: list[Org]) -> list[Shipment]:
  """Shipments of the `needed` organisations and two others (4 to 7 each, distinct dates)."""
  others = [o for o in world.orgs if o not in needed]
  rows = []
  for org in needed + rng.sample(others, 2):
    for day in rng.sample(_DAYS, rng.randint(4, 7)):
      rows.append(Shipment(day.isoformat(), org.code, rng.randint(5, 900), rng.randint(3, 250)))
  return sorted(rows, key=lambda r: (r.date, r.code))


def write_ledger(path: str, rows: list[Shipment]) -> None:
  """The ledger as a csv, xlsx, docx or pdf file (by `path`'s suffix)."""
  title, note = "Shipments ledger", "Quantities are in units; unit prices in credits."
  table = [LEDGER_HEADER, *(r.row() for r in rows)]
  suffix = os.path.splitext(path)[1]
  if suffix == ".csv":
    with open(path, "w", newline="", encoding="utf-8") as f:
      csv.writer(f).writerows(table)
  elif suffix == ".xlsx":
    import openpyxl

    book = openpyxl.Workbook()
    book.properties.created = book.properties.modified = _FIXED_TIME.replace(tzinfo=None)
    sheet = book.active
    sheet.title = "shipments"
    for row in table:
      sheet.append(list(row))
    book.save(path)
  elif suffix == ".docx":
    import docx

    doc = docx.Document()
    doc.add_heading(title, level=1)
    doc.add_paragraph(note)
    grid = doc.add_table(rows=0, cols=len(LEDGER_HEADER))
    for row in table:
      for cell, value in zip(grid.add_row().cells, row, strict=True):
        cell.text = str(value)
    doc.save(path)
  elif suffix == ".pdf":
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_creation_date(_FIXED_TIME)
    pdf.add_page()
    pdf.set_font("Helvetica", size=10)
    for line in (title, note, *(files.TABLE_SEP.join(map(str, row)) for row in table)):
      pdf.cell(text=line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(path)
  else:
    raise ValueError(f"no ledger writer for {suffix!r}; formats: {FORMATS}")
