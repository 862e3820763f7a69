"""The tool interface: schemas, argument checks, errors as observations, bounded outputs."""

import pytest

from psynth_jax.agents.tools import Tool, Toolbox


def _add(a: int, b: float = 0.5) -> float:
  return a + b


ADD = Tool("add", "Adds two numbers.", {"a": int, "b": float}, _add, required=("a",))


def test_a_call_checks_its_arguments_and_never_raises():
  box = Toolbox([ADD, Tool("boom", "Fails.", {}, lambda: 1 / 0)])
  assert box.call("add", {"a": 1, "b": 2}).text == "3"  # an integer is a JSON number
  assert box.call("add", {"a": 1}).text == "1.5"
  for args, reason in (
    ({"b": 1.0}, "missing required arguments ['a']"),
    ({"a": "1"}, "'a' must be integer, got str"),
    ({"a": True}, "'a' must be integer, got bool"),
    ({"a": 1, "c": 2}, "unknown arguments ['c']"),
  ):
    obs = box.call("add", args)
    assert obs.error and reason in obs.text, (args, obs)
  assert box.call("add", ["a"]).error
  obs = box.call("boom", {})
  assert obs.error and "ZeroDivisionError" in obs.text
  obs = box.call("search", {})
  assert obs.error and "['add', 'boom']" in obs.text


def test_outputs_are_cut_and_the_cut_recorded():
  tool = Tool("echo", "Repeats.", {"n": int}, lambda n: "x" * n, max_chars=10)
  short, long = tool({"n": 10}), tool({"n": 25})
  assert short.text == "x" * 10 and not short.truncated and short.full_chars == 10
  assert long.truncated and long.full_chars == 25 and long.text.startswith("x" * 10)
  assert "25 characters" in long.text and long.text.count("x") == 10


def test_schema_is_the_function_calling_form():
  schema = Tool("add", "Adds.", {"a": int, "b": float}, _add, descriptions={"a": "first"}).schema()
  assert schema == {
    "type": "function",
    "function": {
      "name": "add",
      "description": "Adds.",
      "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer", "description": "first"}, "b": {"type": "number"}},
        "required": ["a", "b"],
      },
    },
  }
  with pytest.raises(TypeError):
    Tool("bad", "x", {"a": set}, _add)
  with pytest.raises(ValueError):
    Tool("bad name", "x", {}, _add)
  with pytest.raises(ValueError):
    Toolbox([ADD, ADD])
