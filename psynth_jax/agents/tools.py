"""Tools an agent can call: plain typed functions with a JSON schema, registered by name.

  tool = Tool("search", "Search the local documents.", {"query": str, "k": int}, search_fn,
              required=("query",))
  box = Toolbox([tool, ...])
  obs = box.call("search", {"query": "red fox"})   # never raises
  obs.text, obs.error, obs.truncated

A call never raises: an unknown tool, a missing or mistyped argument, or an exception in
the tool becomes an `Observation` with `error=True` whose text says what went wrong (what
an agent is shown). Every output is cut to the tool's `max_chars` and the cut recorded
(`truncated`, `full_chars`), so one call cannot flood a context.

Schemas: `parameters` maps each argument to its Python type (str, int, float, bool, list,
dict); `schema()` gives the OpenAI / Hugging Face function-calling form
(`{"type": "function", "function": {"name", "description", "parameters": {...}}}`)
that chat templates with a `tools` argument render.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_JSON_TYPES = {
  str: "string",
  int: "integer",
  float: "number",
  bool: "boolean",
  list: "array",
  dict: "object",
}


@dataclasses.dataclass(frozen=True)
class Observation:
  """What a tool call returned, as the agent sees it."""

  text: str
  error: bool = False
  truncated: bool = False
  full_chars: int = 0  # the output's length before truncation


@dataclasses.dataclass(frozen=True)
class Tool:
  """A named function with typed arguments.

  Attributes:
    name: how the agent calls it.
    description: one or two sentences for the agent's prompt.
    parameters: argument -> Python type (str, int, float, bool, list, dict).
    fn: fn(**arguments) -> str (or anything `str()` renders).
    required: arguments that must be given (default: all of them).
    descriptions: argument -> a short description for the schema.
    max_chars: outputs longer than this are cut (and the cut recorded).
  """

  name: str
  description: str
  parameters: Mapping[str, type]
  fn: Callable[..., Any]
  required: tuple[str, ...] | None = None
  descriptions: Mapping[str, str] = dataclasses.field(default_factory=dict)
  max_chars: int = 4000

  def __post_init__(self):
    if not self.name.isidentifier():
      raise ValueError(f"a tool name is an identifier, got {self.name!r}")
    if bad := [a for a, t in self.parameters.items() if t not in _JSON_TYPES]:
      raise TypeError(f"tool {self.name}: arguments {bad} have types with no JSON schema")
    if unknown := set(self.required or ()) - set(self.parameters):
      raise ValueError(f"tool {self.name}: required {sorted(unknown)} are not parameters")

  @property
  def required_args(self) -> tuple[str, ...]:
    return tuple(self.parameters) if self.required is None else self.required

  def schema(self) -> dict:
    props = {}
    for arg, typ in self.parameters.items():
      props[arg] = {"type": _JSON_TYPES[typ]}
      if arg in self.descriptions:
        props[arg]["description"] = self.descriptions[arg]
    return {
      "type": "function",
      "function": {
        "name": self.name,
        "description": self.description,
        "parameters": {"type": "object", "properties": props, "required": list(self.required_args)},
      },
    }

  def check(self, arguments: Mapping[str, Any]) -> str | None:
    """Why `arguments` do not fit the schema, or None."""
    if not isinstance(arguments, Mapping):
      return f"arguments must be an object of named values, got {type(arguments).__name__}"
    if unknown := [a for a in arguments if a not in self.parameters]:
      return f"unknown arguments {unknown}; {self.name} takes {list(self.parameters)}"
    if missing := [a for a in self.required_args if a not in arguments]:
      return f"missing required arguments {missing}"
    for arg, value in arguments.items():
      want = self.parameters[arg]
      # JSON has one number type: an integer is a valid float; a bool is no int here.
      ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
      if want is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
      if not ok:
        return f"argument {arg!r} must be {_JSON_TYPES[want]}, got {type(value).__name__}"
    return None

  def __call__(self, arguments: Mapping[str, Any]) -> Observation:
    if reason := self.check(arguments):
      return Observation(f"Error: {self.name}: {reason}", error=True)
    try:
      text = str(self.fn(**arguments))
    except Exception as e:  # the agent is told, and goes on
      text = f"Error: {self.name} raised {type(e).__name__}: {e}"
      return _bounded(text, self.max_chars, error=True)
    return _bounded(text, self.max_chars, error=False)


def _bounded(text: str, max_chars: int, error: bool) -> Observation:
  if len(text) <= max_chars:
    return Observation(text, error=error, full_chars=len(text))
  note = f"\n[output cut: {len(text)} characters, first {max_chars} shown]"
  return Observation(text[:max_chars] + note, error=error, truncated=True, full_chars=len(text))


class Toolbox:
  """The tools one agent may call, by name."""

  def __init__(self, tools: Iterable[Tool] = ()):
    self._tools: dict[str, Tool] = {}
    for tool in tools:
      self.add(tool)

  def add(self, tool: Tool) -> None:
    if tool.name in self._tools:
      raise ValueError(f"a tool named {tool.name!r} is already in this toolbox")
    self._tools[tool.name] = tool

  def names(self) -> list[str]:
    return list(self._tools)

  def __getitem__(self, name: str) -> Tool:
    return self._tools[name]

  def __contains__(self, name: str) -> bool:
    return name in self._tools

  def schemas(self) -> list[dict]:
    return [t.schema() for t in self._tools.values()]

  def call(self, name: str, arguments: Mapping[str, Any]) -> Observation:
    """Runs a call; an unknown name is an error observation naming the tools there are."""
    if name not in self._tools:
      return Observation(f"Error: no tool named {name!r}; tools: {self.names()}", error=True)
    return self._tools[name](arguments)
