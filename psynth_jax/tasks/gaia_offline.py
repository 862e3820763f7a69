"""`gaia_offline`: GAIA-style questions that need tools, generated offline from a seed.

GAIA itself is in no package (`psynth_jax.tasks.agents.GAIATask` reads a user's copy), so
this task generates its own: each problem has a small made-up world (`World`: towns,
people and organisations with invented names, one document each, ~30 documents) and,
where the question needs one, an attached shipments ledger (date, product code, quantity,
unit price) in one of csv, xlsx, docx or pdf. Every value an answer needs exists only in
that world's documents and ledger, so none can be guessed or remembered.

Levels count tool steps, as GAIA's do (`meta["steps"]`: the shortest plan):
  1. one step: a fact of one document (search), or one row of the ledger (parse_file);
  2. three: an organisation's product code (search), the ledger (parse_file) and a
     computation over its rows (python): a total, a revenue, a range;
  3. four: two chained documents (search, search: e.g. the organisation a founder
     directs), the ledger and a computation.
Problems interleave the levels (1, 2, 3, 1, ...) and rotate through the variants and file
formats, so any prefix (`limit`) is balanced. Text is generated (no data package), so no
licence applies.

Reproducible from meta alone: `meta` holds the generator version, the world seed, the
level, variant and file name, and `toolbox(problem, workdir)` rebuilds the world, writes
the attachment into `workdir` and returns the episode's tools (search, visit, parse_file,
python). For a problem of `gaia` (GAIA proper) `toolbox` copies its attached file into
`workdir` and gives parse_file and python (and search / visit over a corpus you pass).
Prompts, answer format and score are GAIA's (`GAIATask`: "FINAL ANSWER:", normalised
exact match).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil

from psynth_jax.agents import documents, files
from psynth_jax.agents.tools import Toolbox
from psynth_jax.tasks import agents
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.gaia_world import FORMATS, Shipment, World, ledger, write_ledger

GENERATOR = 1  # bump when a seed would generate different problems
SPLITS = {"validation": 30, "test": 60}  # default sizes; `load(size=)` makes more


LEDGER = (
  "The attached file is a shipments ledger (date, product code, quantity, unit price in credits)."
)
CODES = "The local document collection gives each organisation's product code."
DOCS = "according to the local document collection"


def _units(rows, code, year=None) -> int:
  return sum(r.quantity for r in rows if r.code == code and (year is None or r.date[:4] == year))


def _revenue(rows, code) -> int:
  return sum(r.quantity * r.unit_price for r in rows if r.code == code)


def _question(world: World, rng: random.Random, variant: str):
  """(question, answer, steps, ledger or None) of one variant."""
  a = rng.choice(world.orgs)
  if variant == "founded":
    return f"In what year was the {a.name} founded, {DOCS}?", a.founded, ["search"], None
  if variant == "headquarters":
    return f"In which town is the {a.name} headquartered, {DOCS}?", a.town, ["search"], None
  if variant == "founder":
    return f"Who founded the {a.name}, {DOCS}? Give the full name.", a.founder, ["search"], None
  if variant == "population":
    t = rng.choice(world.towns)
    return f"What is the population of {t.name}, {DOCS}?", t.population, ["search"], None
  if variant == "lookup":
    rows = ledger(rng, world, [])
    r = rng.choice(rows)
    q = f"{LEDGER} How many units of product {r.code} were shipped on {r.date}?"
    return q, r.quantity, ["parse_file"], rows
  plan2 = ["search", "parse_file", "python"]
  plan3 = ["search", "search", "parse_file", "python"]
  if variant == "total":
    rows = ledger(rng, world, [a])
    q = f"{LEDGER} {CODES} How many units did the {a.name} ship in total, according to the ledger?"
    return q, _units(rows, a.code), plan2, rows
  if variant == "revenue":
    rows = ledger(rng, world, [a])
    q = (f"{LEDGER} {CODES} What was the total revenue of the {a.name} in the ledger, in credits"
         " (the sum over its shipments of quantity times unit price)?")  # fmt: skip
    return q, _revenue(rows, a.code), plan2, rows
  if variant == "range":
    rows = ledger(rng, world, [a])
    sizes = [r.quantity for r in rows if r.code == a.code]
    q = (f"{LEDGER} {CODES} How many more units did the largest shipment of the {a.name} in the"
         " ledger have than its smallest one?")  # fmt: skip
    return q, max(sizes) - min(sizes), plan2, rows
  if variant == "founder_directs":  # A's founder directs B
    a = rng.choice([o for o in world.orgs if any(b.director == o.founder for b in world.orgs)])
    b = world.org(director=a.founder)
    rows = ledger(rng, world, [b])
    year = rng.choice(sorted({r.date[:4] for r in rows if r.code == b.code}))
    q = (f"{LEDGER} {CODES} The founder of the {a.name} is also the director of another"
         f" organisation. How many units did that organisation ship in {year}, according to"
         " the ledger?")  # fmt: skip
    return q, _units(rows, b.code, year), plan3, rows
  if variant == "birthplace_hq":  # P was born in the town where B is headquartered
    hq = {o.town for o in world.orgs}
    p = rng.choice([p for p in world.people if p.birthplace in hq])  # 12 people, 8 of 10 towns
    b = world.org(town=p.birthplace)
    rows = ledger(rng, world, [b])
    q = (f"{LEDGER} {CODES} What was the total revenue, in credits (the sum of quantity times"
         " unit price), of the organisation headquartered in the town where"
         f" {p.name} was born, according to the ledger?")  # fmt: skip
    return q, _revenue(rows, b.code), plan3, rows
  if variant == "director_founded":  # A's director founded C
    a = rng.choice([o for o in world.orgs if any(c.founder == o.director for c in world.orgs)])
    c = world.org(founder=a.director)
    rows = ledger(rng, world, [a, c])
    q = (f"{LEDGER} {CODES} The director of the {a.name} founded another organisation. What"
         " is the absolute difference between the total numbers of units the two"
         " organisations shipped, according to the ledger?")  # fmt: skip
    return q, abs(_units(rows, a.code) - _units(rows, c.code)), plan3, rows
  raise ValueError(f"unknown gaia_offline variant {variant!r}")


VARIANTS = {
  1: ("founded", "lookup", "headquarters", "founder", "population"),
  2: ("total", "revenue", "range"),
  3: ("founder_directs", "birthplace_hq", "director_founded"),
}


@dataclasses.dataclass(frozen=True)
class Episode:
  """Everything one problem's world holds."""

  world: World
  question: str
  answer: str
  steps: list[str]
  ledger: list[Shipment] | None


def generate(world_seed: int, variant: str) -> Episode:
  """The episode a seed gives: the world, then the question and its ledger (same rng)."""
  rng = random.Random(world_seed)
  world = World(rng)
  question, answer, steps, rows = _question(world, rng, variant)
  return Episode(world, question, str(answer), steps, rows)


def _world_seed(split: str, seed: int, index: int) -> int:
  digest = hashlib.sha256(f"gaia_offline/{GENERATOR}/{split}/{seed}/{index}".encode()).digest()
  return int.from_bytes(digest[:8], "big")


def make_problem(split: str, seed: int, index: int) -> Problem:
  level, turn = index % 3 + 1, index // 3
  variant = VARIANTS[level][turn % len(VARIANTS[level])]
  world_seed = _world_seed(split, seed, index)
  episode = generate(world_seed, variant)
  pid = f"{split}-{seed}-{index:03d}"
  file_name = f"{pid}.{FORMATS[turn % len(FORMATS)]}" if episode.ledger else ""
  meta = {
    "family": f"level{level}",
    "level": level,
    "variant": variant,
    "generator": GENERATOR,
    "world_seed": world_seed,
    "file_name": file_name,
    "steps": episode.steps,
  }
  return Problem(pid, episode.question, episode.answer, meta)


def toolbox(problem: Problem, workdir: str, corpus: documents.Corpus | None = None) -> Toolbox:
  """The tools of one episode, its attached file written (or copied) into `workdir`.

  A `gaia_offline` problem: search and visit over its world's documents, parse_file over
  `workdir`, python with the attachment in its directory. A GAIA problem (`file_path` in
  meta): its attachment copied into `workdir`; parse_file and python, and search / visit
  over `corpus` when given (GAIA proper expects the web: there is no offline corpus).
  parse_file reads anything in `workdir`: give each episode its own.
  """
  os.makedirs(workdir, exist_ok=True)
  meta = problem.meta
  name = meta.get("file_name") or ""
  if "world_seed" in meta:
    if meta.get("generator") != GENERATOR:
      raise ValueError(
        f"{problem.id} was generated by gaia_offline generator {meta.get('generator')},"
        f" this is {GENERATOR}: regenerate the problems"
      )
    episode = generate(meta["world_seed"], meta["variant"])
    corpus = episode.world.corpus() if corpus is None else corpus
    if name:
      write_ledger(os.path.join(workdir, name), episode.ledger)
  elif name:
    shutil.copyfile(meta["file_path"], os.path.join(workdir, name))
  tools = [] if corpus is None else [documents.search_tool(corpus), documents.visit_tool(corpus)]
  attached = [os.path.join(workdir, name)] if name else []
  return Toolbox([*tools, files.parse_file_tool(workdir), files.python_tool(attached)])


class GaiaOfflineTask(agents.GAIATask):
  """The generated set (module docstring) with GAIA's prompts and scoring.

  `load(split="test", limit=None, seed=0, level=None, size=None)`: the splits are
  "validation" (30 problems) and "test" (60), disjoint; `seed` picks another set of the
  same split; `size` generates that many instead of the default; `level` keeps those
  levels; `limit` keeps the first problems. There is no file to read: `path` must be None
  (GAIA proper is the task `gaia`). Ids are "<split>-<seed>-<index>"; meta as the module
  docstring says.
  """

  name = "gaia_offline"

  def load(self, path=None, *, split="test", limit=None, seed=0, level=None, size=None):
    if path is not None:
      raise ValueError("gaia_offline is generated, it reads no file; for GAIA itself use 'gaia'")
    if split not in SPLITS:
      raise ValueError(f"gaia_offline's splits are {tuple(SPLITS)}, got {split!r}")
    levels = agents._levels(level)
    count = SPLITS[split] if size is None else size
    problems = [make_problem(split, seed, i) for i in range(count) if i % 3 + 1 in levels]
    return problems[:limit]

  def toolbox(self, problem: Problem, workdir: str) -> Toolbox:
    return toolbox(problem, workdir)


GAIA_OFFLINE = GaiaOfflineTask()
