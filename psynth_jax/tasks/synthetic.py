"""Seeded synthetic agent-workflow suite, its prompt formats and its word-level tokenizer.

Three families mirror real worker-branch roles; every text is short, lowercase and
regular so that a tiny model can learn the whole suite:

- `evidence`: each branch is a retrieved passage ("zed lives in oslo."); the
  question needs two of them (two hops), the other branches are distractors.
  City->country maps are random per example, so answers must be read, not recalled.
- `candidates`: branches show worked solutions of one expression ("7+5*2: 5*2=10,
  7+10=17"); wrong ones go left to right or right to left; at least one is right.
- `tools`: branches hold tool results ("price: apple 4, fig 7", values 1-9) to max,
  min, count, sort or add in pairs, sometimes mixed with another tool's results.

Targets may carry a working before the answer: evidence targets quote the two facts
in hop order ("zed lives in oslo. oslo is in norway => norway"), tools targets list
what they looked up ("apple 4 plus fig 7 => 11"). Each token of a working is then a
copy from the question or a continuation of a phrase seen in a branch (what
induction heads do), and a synthesizer does one lookup per emitted token instead
of composing two in one forward pass, which is what makes the suite learnable by
a few-million-parameter model on a CPU. In evidence and tools texts every word and
number keeps its leading space, so a key has one token id in the question, the
branches and the answer, and a tool's value sits right after its item.
`answer_matches` scores only the part after the last "=>". `SyntheticTask` is the
suite as a registered task (`psynth_jax.tasks.get("synthetic")`).

Splits are disjoint by construction: an example belongs to the split picked by a hash
of its question and branches, or of its question alone where that fixes the answer
(`candidates`), so no test answer can be memorised. The suite's prompt formats live here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence

from psynth_jax.tasks.base import Problem, Task

FAMILIES = ("evidence", "candidates", "tools")
SPLITS = ("train", "validation", "test")
MAX_WORKERS = 8
# Percent of the content-hash space owned by each split.
_SPLIT_BUCKETS = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>", "<unk>")
PUNCTUATION = "\n .,:?=>+-*()[]'"
MAX_NUMBER = 999  # every number is one token; the generators stay at or below this
MAX_SORT = 5  # tools examples with more items ask no sort question
END_MARKER = "<eos>"
# The words of the prompt formats and families' templates (names and items are added below).
_TEMPLATE_WORDS = """
q a out given latent info from previous agents worker look up found solve by precedence left to
right calc call result what is which country does live lives in who city s friend fruit fruits
animal animals person people of all highest lowest sort the first how many have above plus none
"""

PEOPLE = ("zed", "ann", "bob", "kim", "lea", "max", "ida", "tom", "eva", "sam", "joe", "mia")
CITIES = ("oslo", "rome", "lima", "kyiv", "doha", "riga", "baku", "bern", "pune", "cork", "quito")
COUNTRIES = ("norway", "peru", "chad", "mali", "fiji", "cuba", "oman", "laos", "togo", "spain")
_PERSON_FILLERS = ("likes tea", "likes jazz", "has a dog", "has a cat", "plays chess", "can swim")
_PLACE_FILLERS = ("is big", "is old", "is by the sea", "has a port", "is cold", "is hot")
_TOOLS = {
  "price": ("fruit", "fruits", ("apple", "fig", "kiwi", "lime", "pear", "plum", "date", "mango")),
  "weight": ("animal", "animals", ("cat", "dog", "cow", "pig", "fox", "owl", "yak", "hen")),
  "age": ("person", "people", PEOPLE[:8]),
}
_METHODS = {"precedence": "by precedence", "left": "left to right", "right": "right to left"}
WORDS = tuple(
  sorted(
    set(_TEMPLATE_WORDS.split())
    | set(PEOPLE + CITIES + COUNTRIES)
    | {w for phrase in _PERSON_FILLERS + _PLACE_FILLERS for w in phrase.split()}
    | {w for tool, (noun, plural, items) in _TOOLS.items() for w in (tool, noun, plural, *items)}
  )
)


@dataclasses.dataclass(frozen=True)
class Example:
  """One workflow instance: K worker prompts, their outputs (branches) and the answer."""

  id: str
  family: str
  question: str
  branches: tuple[str, ...]
  worker_prompts: tuple[str, ...]
  answer: str
  working: str = ""  # target text before " => answer"; empty: the target is the answer

  def to_json(self) -> dict:
    """The suite's own JSONL record (`write_jsonl`); traces are `psynth_jax.train.data`'s."""
    return {
      "id": self.id,
      "family": self.family,
      "question": self.question,
      "branches": list(self.branches),
      "worker_prompts": list(self.worker_prompts),
      "answer": self.answer,
      "working": self.working,
    }

  @classmethod
  def from_json(cls, record: dict) -> Example:
    """Inverse of `to_json`; records without `answer` take it (and the working) from `target`."""
    working = record.get("working", "")
    if "answer" in record:
      answer = record["answer"]
    else:
      target = record["target"].split(END_MARKER)[0]
      working, _, answer = target.strip().rpartition(" => ")
    return cls(
      id=str(record["id"]),
      family=record.get("family", ""),
      question=record["question"],
      branches=tuple(record["branches"]),
      worker_prompts=tuple(record.get("worker_prompts", ())),
      answer=answer.strip(),
      working=working,
    )

  def problem(self) -> Problem:
    """This example as the task interface's `Problem` (the rest in `meta`)."""
    meta = {
      "family": self.family,
      "branches": self.branches,
      "instructions": self.worker_prompts,
      "working": self.working,
    }
    return Problem(self.id, self.question, self.answer, meta)

  @classmethod
  def of(cls, problem: Problem) -> Example:
    """Inverse of `problem`; fields a problem lacks (a trace's) are empty."""
    m = problem.meta
    return cls(
      problem.id,
      m.get("family", ""),
      problem.question,
      tuple(m.get("branches", ())),
      tuple(m.get("instructions", ())),
      problem.answer,
      m.get("working", ""),
    )


# ---------------------------------------------------------------- prompt formats
# Prompts end in ":" and completions start with " " (see SuiteTokenizer): the space
# belongs to the first word, as in "[worker 1]: text" where branches are pasted.
def worker_prompt_text(example: Example, i: int) -> str:
  """Worker i's prompt: restates the task, then its own instruction and data."""
  return f"q: {example.question}\n{example.worker_prompts[i]}\nout:"


def worker_target_text(example: Example, i: int, end_marker: str = END_MARKER) -> str:
  """What worker i should emit after `worker_prompt_text`: branch i as output, then the end marker."""
  return branch_as_output(example.branches[i]) + end_marker


def branch_as_output(branch: str) -> str:
  """A branch as its worker writes it after the prompt's ":" (a leading space)."""
  return " " + branch


def branch_from_output(text: str) -> str:
  """The branch text of a worker's decoded output (inverse of `branch_as_output`)."""
  return text.removeprefix(" ")


def synth_prompt_text(example: Example) -> str:
  """The synthesizer prompt that follows the merged branch caches."""
  return f"given latent info from previous agents.\nq: {example.question}\na:"


def text_synthesis_prompt_text(example: Example) -> str:
  """Text-concatenation baseline: every worker output as text, then the question."""
  blocks = "".join(f"[worker {i + 1}]: {b}\n" for i, b in enumerate(example.branches))
  return f"{blocks}q: {example.question}\na:"


def single_agent_prompt_text(example: Example) -> str:
  """Single-agent baseline: the question alone."""
  return f"q: {example.question}\na:"


def target_text(example: Example, end_marker: str = END_MARKER) -> str:
  """ " " [working " => "] answer, then the end marker (pass another tokenizer's eos string)."""
  prefix = f"{example.working} => " if example.working else ""
  return " " + prefix + example.answer + end_marker


def _normalise(text: str) -> str:
  text = re.split(r"<|\n", text, maxsplit=1)[0].rsplit("=>", 1)[-1].strip().lower()
  text = re.sub(r"^(a|answer)\s*:", "", text).strip().rstrip(".").strip()
  text = re.sub(r"\s*,\s*", ",", re.sub(r"\s+", " ", text))
  try:
    return repr(float(text))
  except ValueError:
    return text


def answer_matches(pred: str, gold: str) -> bool:
  """Normalised exact match of pred's answer: its first line (up to an end marker or
  newline), after the last "=>" when it shows working."""
  return _normalise(pred) == _normalise(gold) != ""


# ---------------------------------------------------------------- families
def _with_fillers(rng: random.Random, subject: str, fact: str, person: bool) -> str:
  """Pads a passage with 0-2 irrelevant sentences so branch lengths vary."""
  pool = _PERSON_FILLERS if person else _PLACE_FILLERS
  n = rng.choices((0, 1, 2), weights=(5, 3, 2))[0]
  sentences = [f"{subject} {f}." for f in rng.sample(pool, n)]
  sentences.insert(rng.randint(0, n), fact)
  return " ".join(sentences)


def _evidence(rng: random.Random, k: int):
  variant = rng.choice(("country", "who", "friend_city"))
  people = rng.sample(PEOPLE, len(PEOPLE))
  cities = rng.sample(CITIES, len(CITIES))
  countries = rng.sample(COUNTRIES, len(COUNTRIES))
  p, friend, city, country = people[0], people[1], cities[0], countries[0]
  lives = (friend if variant == "friend_city" else p, f"lives in {city}", True)
  chain = [lives]  # (subject, predicate, is_person)
  if variant == "friend_city":
    chain.append((f"{p}'s friend", f"is {friend}", True))
  else:
    chain.append((city, f"is in {country}", False))
  fact = [f"{subject} {predicate}" for subject, predicate, _ in chain]
  # The working quotes the two facts in the order the hops use them.
  question, working, answer = {
    "country": (f"which country does {p} live in?", f"{fact[0]}. {fact[1]}", country),
    "who": (f"who lives in {country}?", f"{fact[1]}. {fact[0]}", p),
    "friend_city": (f"which city does {p}'s friend live in?", f"{fact[1]}. {fact[0]}", city),
  }[variant]
  # Distractors come from a separate consistent world, so they never touch the chain.
  dp, dc, dn = people[2:6], cities[1:5], countries[1:]
  world = [(q, f"lives in {rng.choice(dc)}", True) for q in dp]
  world += [(c, f"is in {rng.choice(dn)}", False) for c in dc]
  world += [(f"{x}'s friend", f"is {y}", True) for x, y in (dp[:2], dp[2:])]
  facts = chain + rng.sample(world, k - len(chain))
  rng.shuffle(facts)
  branches, prompts = [], []
  for subject, predicate, person in facts:
    key = subject.split("'")[0]
    branches.append(_with_fillers(rng, key, f"{subject} {predicate}.", person))
    prompts.append(f"look up: {key}\nfound: {branches[-1]}")
  return question, branches, prompts, answer, working


def _solve(nums: Sequence[int], ops: Sequence[str], method: str) -> tuple[list[str], int | None]:
  """Evaluates step by step in the given order; None when a step goes negative."""
  nums, ops, steps = list(nums), list(ops), []
  while ops:
    first_mul = ops.index("*") if "*" in ops else 0
    j = {"precedence": first_mul, "left": 0, "right": len(ops) - 1}[method]
    a, b, op = nums[j], nums[j + 1], ops[j]
    value = a + b if op == "+" else a - b if op == "-" else a * b
    if value < 0:
      return steps, None
    steps.append(f"{a}{op}{b}={value}")
    nums[j : j + 2] = [value]
    del ops[j]
  return steps, nums[0]


def _candidates(rng: random.Random, k: int):
  while True:
    n_ops = rng.choice((2, 2, 3))
    ops = [rng.choice("+-*") for _ in range(n_ops)]
    if "*" not in ops or not set(ops) & set("+-"):
      continue
    nums = [rng.randint(2, 9) for _ in range(n_ops + 1)]
    solved = {m: _solve(nums, ops, m) for m in _METHODS}
    right = solved["precedence"][1]
    wrong = [m for m, (_, v) in solved.items() if v is not None and v != right]
    steps = [int(step.rsplit("=", 1)[1]) for st, _ in solved.values() for step in st]
    if right is not None and wrong and max(steps) <= MAX_NUMBER:
      break
  expr = "".join(f"{x}{o}" for x, o in zip(nums, ops, strict=False)) + str(nums[-1])
  correct = [m for m, (_, v) in solved.items() if v == right]
  n_right = rng.randint(1, k - 1)
  methods = [rng.choice(correct) for _ in range(n_right)] + [
    rng.choice(wrong) for _ in range(k - n_right)
  ]
  rng.shuffle(methods)
  branches = [f"{expr}: {', '.join(solved[m][0])}" for m in methods]
  prompts = [f"solve {expr} {_METHODS[m]}\ncalc: {', '.join(solved[m][0])}" for m in methods]
  return f"what is {expr}?", branches, prompts, str(right), ""


def _tool_result(tool: str, pairs: Sequence[tuple[str, int]]) -> str:
  """A tool call's output as its worker writes it: "price: apple 4, fig 7"."""
  return f"{tool}: " + ", ".join(f"{x} {v}" for x, v in pairs)


def _tool_results(text: str) -> dict[str, dict[str, int]]:
  """Inverse of `_tool_result` over branch texts: tool -> item -> value."""
  table: dict[str, dict[str, int]] = {}
  for tool, pairs in re.findall(r"(\w+): ((?:\w+ \d+(?:, )?)+)", text):
    table.setdefault(tool, {}).update((x, int(v)) for x, v in re.findall(r"(\w+) (\d+)", pairs))
  return table


def _tools(rng: random.Random, k: int):
  attr, other = rng.sample(sorted(_TOOLS), 2)
  noun, plural, pool = _TOOLS[attr]
  n_other = rng.randint(1, k - 2) if k >= 4 and rng.random() < 0.4 else 0
  n_main = k - n_other
  n_items = min(len(pool), n_main + sum(rng.random() < 0.25 for _ in range(n_main)))
  items = rng.sample(pool, n_items)
  # Distinct one-digit values: comparisons and sums stay within reach of a tiny model.
  values = dict(zip(items, rng.sample(range(1, 10), n_items), strict=True))
  groups = [[item] for item in items[:n_main]]
  for item in items[n_main:]:
    rng.choice(groups).append(item)
  other_items = rng.sample(_TOOLS[other][2], n_other)
  groups = [(attr, [(x, values[x]) for x in g]) for g in groups]
  groups += [(other, [(x, rng.randint(1, 9))]) for x in other_items]
  rng.shuffle(groups)
  branches = [_tool_result(tool, pairs) for tool, pairs in groups]
  prompts = [
    f"call: {tool} {', '.join(x for x, _ in pairs)}\nresult: {', '.join(str(v) for _, v in pairs)}"
    for tool, pairs in groups
  ]
  ranked = sorted(items, key=values.get)
  in_order = [x for tool, pairs in groups for x, _ in pairs if tool == attr]  # as listed
  t = rng.randint(1, 8)
  above = [x for x in in_order if values[x] > t]
  a, b = rng.sample(items, 2)
  # Sorting is the question that needs every branch; past MAX_SORT items it is
  # beyond the tiny model, so larger tools examples ask the others.
  kinds = ["max", "min", "count", "pair"] + (["sort"] if n_items <= MAX_SORT else [])
  # (question, working, answer); the working lists what was looked up.
  question, working, answer = {
    "max": (f"which {noun} has the highest {attr}?", "", ranked[-1]),
    "min": (f"which {noun} has the lowest {attr}?", "", ranked[0]),
    "sort": (f"sort the {plural} by {attr}, lowest first.", "", ", ".join(ranked)),
    "count": (
      f"how many {plural} have {attr} above {t}?",
      ", ".join(above) or "none",
      str(len(above)),
    ),
    "pair": (
      f"what is the {attr} of {a} plus {b}?",
      f"{a} {values[a]} plus {b} {values[b]}",
      str(values[a] + values[b]),
    ),
  }[rng.choice(kinds)]
  return question, branches, prompts, answer, working


def follow_up_questions(example: Example) -> list[tuple[str, str, str]]:
  """Every other question the example's branches answer: (question, working, answer).

  Read from the branch texts alone, in the families' own templates; a question is
  kept only if its answer is unique. Pretraining asks several of them after one
  set of branches, so each long text-synthesis sequence carries several answers
  to learn from instead of one (`candidates` examples have none).
  """
  text = " ".join(example.branches)
  out = []
  if example.family == "evidence":
    lives = dict(re.findall(r"(\w+) lives in (\w+)", text))
    country_of = dict(re.findall(r"(\w+) is in (\w+)", text))
    friend = dict(re.findall(r"(\w+)'s friend is (\w+)", text))
    residents = {}
    for person, city in lives.items():
      if city in country_of:
        facts = f"{person} lives in {city}", f"{city} is in {country_of[city]}"
        out.append((f"which country does {person} live in?", ". ".join(facts), country_of[city]))
        residents.setdefault(country_of[city], []).append((person, facts))
    for country, pairs in residents.items():
      if len(pairs) == 1:
        person, facts = pairs[0]
        out.append((f"who lives in {country}?", ". ".join(facts[::-1]), person))
    for person, pal in friend.items():
      if pal in lives:
        facts = f"{person}'s friend is {pal}. {pal} lives in {lives[pal]}"
        out.append((f"which city does {person}'s friend live in?", facts, lives[pal]))
  elif example.family == "tools":
    for attr, values in _tool_results("\n".join(example.branches)).items():
      noun, plural, _ = _TOOLS[attr]
      if len(values) < 2:
        continue
      ranked = sorted(values, key=values.get)
      if len(set(values.values())) == len(values):
        out.append((f"which {noun} has the highest {attr}?", "", ranked[-1]))
        out.append((f"which {noun} has the lowest {attr}?", "", ranked[0]))
        if len(values) <= MAX_SORT:
          out.append((f"sort the {plural} by {attr}, lowest first.", "", ", ".join(ranked)))
      a, b = ranked[0], ranked[-1]
      pair = f"{a} {values[a]} plus {b} {values[b]}"
      out.append((f"what is the {attr} of {a} plus {b}?", pair, str(values[a] + values[b])))
      t = values[ranked[len(ranked) // 2]]
      above = [x for x in values if values[x] > t]
      out.append(
        (f"how many {plural} have {attr} above {t}?", ", ".join(above) or "none", str(len(above)))
      )
  return [q for q in out if q[0] != example.question]


_GENERATORS = {"evidence": _evidence, "candidates": _candidates, "tools": _tools}


def _content_key(question: str, branches: Iterable[str]) -> str:
  return "\x1f".join([question, *branches])


def split_of(example: Example) -> str:
  """The only split whose `generate` can emit this example's content."""
  branches = () if example.family == "candidates" else example.branches
  digest = hashlib.sha256(_content_key(example.question, branches).encode()).hexdigest()
  bucket = int(digest[:8], 16) % 100
  return next(s for s, (lo, hi) in _SPLIT_BUCKETS.items() if lo <= bucket < hi)


def generate(
  split: str,
  n: int,
  seed: int = 0,
  families: Sequence[str] | None = None,
  min_workers: int = 2,
  max_workers: int = MAX_WORKERS,
) -> list[Example]:
  """Generates n distinct examples of one split, deterministic for (split, n, seed).

  Families alternate in order; K is uniform in [min_workers, max_workers]. A
  shorter run is a prefix of a longer one with the same arguments.

  Args:
    split: "train", "validation" or "test"; splits never share content or ids.
    n: number of examples.
    seed: picks one of many suites per split.
    families: subset of FAMILIES (default all).
    min_workers: smallest K (>= 2).
    max_workers: largest K (<= MAX_WORKERS).

  Returns:
    The examples, ids "<split>-<seed>-<index>".
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  families = tuple(families or FAMILIES)
  if unknown := set(families) - set(FAMILIES):
    raise ValueError(f"unknown families {sorted(unknown)}")
  if not 2 <= min_workers <= max_workers <= MAX_WORKERS:
    raise ValueError(f"need 2 <= min_workers <= max_workers <= {MAX_WORKERS}")
  # The split name is part of the seed so that splits also draw different streams.
  digest = hashlib.sha256(f"psynth-synthetic/{split}/{seed}".encode()).digest()
  rng = random.Random(int.from_bytes(digest[:8], "big"))
  examples, seen = [], set()
  for _ in range(200 * n + 1000):
    if len(examples) == n:
      break
    family = families[len(examples) % len(families)]
    k = rng.randint(min_workers, max_workers)
    question, branches, prompts, answer, working = _GENERATORS[family](rng, k)
    example_id = f"{split}-{seed}-{len(examples):06d}"
    example = Example(
      example_id, family, question, tuple(branches), tuple(prompts), answer, working
    )
    key = _content_key(question, branches)
    if key in seen or split_of(example) != split:
      continue
    seen.add(key)
    examples.append(example)
  if len(examples) < n:
    raise RuntimeError(f"only {len(examples)} distinct {split} examples found, asked for {n}")
  return examples


def write_jsonl(examples: Iterable[Example], path: str) -> None:
  """Writes one `Example.to_json()` record per line."""
  with open(path, "w", encoding="utf-8") as f:
    for example in examples:
      f.write(json.dumps(example.to_json()) + "\n")


def read_jsonl(path: str) -> list[Example]:
  """Reads records written by `write_jsonl` (or the trainer's schema)."""
  with open(path, encoding="utf-8") as f:
    return [Example.from_json(json.loads(line)) for line in f if line.strip()]


# ---------------------------------------------------------------- the task
class SyntheticTask(Task):
  """The suite as a task: generated problems (or a `write_jsonl` file), raw-text prompts.

  `load` takes the generator's options too: `families`, `min_workers`, `max_workers`.
  A problem's `meta` holds its family, gold branches, the workers' instruction
  lines and the target's working.
  """

  name = "synthetic"
  families = FAMILIES

  def load(self, path=None, *, split="test", limit=None, seed=0, **options) -> list[Problem]:
    if path is not None:
      if options:
        raise ValueError(f"generator options {sorted(options)} do not apply to a file ({path})")
      examples = read_jsonl(path)[:limit]
    else:
      if limit is None:
        raise ValueError("the synthetic suite is generated: give limit= (how many problems)")
      examples = generate(split, limit, seed, **options)
    return [e.problem() for e in examples]

  def worker_prompts(self, problem, k):
    instructions = problem.meta.get("instructions", ())
    if len(instructions) != k:
      raise ValueError(f"synthetic problem {problem.id!r} has {len(instructions)} workers, not {k}")
    ex = Example.of(problem)
    return [worker_prompt_text(ex, i) for i in range(k)]

  def single_agent_prompt(self, problem):
    return single_agent_prompt_text(Example.of(problem))

  def text_synthesis_prompt(self, problem, outputs):
    return text_synthesis_prompt_text(
      dataclasses.replace(Example.of(problem), branches=tuple(outputs))
    )

  def synth_prompt(self, problem):
    return synth_prompt_text(Example.of(problem))

  def target(self, problem):
    return target_text(Example.of(problem))

  def score(self, completion, problem):
    return float(answer_matches(completion, problem.answer))

  def branch_from_output(self, text):
    return branch_from_output(text)

  def branch_as_output(self, branch):
    return branch_as_output(branch)


TASK = SyntheticTask()
