"""The tool-call format: how an agent's output names tool calls, and how the chat turns
around them are rendered to token ids.

Format (Qwen2.5's own, the one its chat template teaches when given `tools`): a call is a
JSON object with the tool's name and its arguments, inside tags, anywhere in the output;
one output may hold several calls, run in order:

  Let me look that up.
  <tool_call>
  {"name": "search", "arguments": {"query": "red fox"}}
  </tool_call>

`"arguments"` is an object (a JSON string holding one is accepted, as some models write
it; absent means no arguments). Small models often drop the tags: an output without them
that is, whole (an optional ```json fence around it aside), one such object, holding
"name" and at most "arguments", is read as one call (`_bare_call`). Any other output with
neither tag is the agent's final answer.
A block that is not such an object, a `<tool_call>` left open or a stray `</tool_call>`
is a *malformed* call: parsing never raises, the agent is shown an error observation
saying what was wrong and how a call is written.

Rendering (`ChatFormat`), through the model's own chat template:
* the first prompt renders the messages with the template's `tools` argument when the
  template teaches the format (it writes `<tool_call>` when given tools, as Qwen2.5's
  does); otherwise the schemas and the format are written into the system message;
* after an output, the next turn's text is exactly what the template writes after an
  assistant message's content: end of turn, one message per observation (role `tool`,
  which Qwen2.5 renders as `<tool_response>` blocks in one user turn; a template
  without a `tool` role gets one user message of such blocks), then the generation
  prompt. It is found by rendering a marker as the assistant's content, so a
  conversation fed turn by turn is the template's rendering of the whole conversation.
The agent's own output ids are kept as generated (never re-rendered): the cache holds
what the model wrote.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

import jinja2

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL_EXAMPLE = (
  '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
_MARK = "\u241epsynth-output\u241e"  # stands for the assistant's output while rendering


def tool_instructions(schemas: Sequence[dict]) -> str:
  """The tools and the format, for a template that does not teach them (Qwen2.5's wording)."""
  listed = "\n".join(json.dumps(t) for t in schemas)
  return (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    f"{listed}\n</tools>\n\nFor each function call, return a json object with function name"
    f" and arguments within <tool_call></tool_call> XML tags:\n{CALL_EXAMPLE}"
  )


@dataclasses.dataclass(frozen=True)
class ToolCall:
  name: str
  arguments: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Malformed:
  """A call that could not be read; `reason` is what the agent is told."""

  reason: str


@dataclasses.dataclass(frozen=True)
class ParsedOutput:
  """One agent output: its calls (`ToolCall` or `Malformed`, in order) and the text
  outside them (the thought, or the answer when there are no calls)."""

  calls: tuple[ToolCall | Malformed, ...]
  text: str

  @property
  def is_final(self) -> bool:
    return not self.calls


def _read_call(body: str) -> ToolCall | Malformed:
  try:
    obj = json.loads(body)
  except json.JSONDecodeError as e:
    return Malformed(f"the call is not valid JSON ({e.msg} at character {e.pos})")
  if not isinstance(obj, dict):
    return Malformed(f"the call must be a JSON object, got {type(obj).__name__}")
  name = obj.get("name")
  if not isinstance(name, str) or not name:
    return Malformed('the call has no "name" string')
  args = obj.get("arguments", {})
  if isinstance(args, str):
    try:
      args = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError:
      return Malformed(f'"arguments" of {name} is a string that is not a JSON object')
  if not isinstance(args, dict):
    return Malformed(f'"arguments" of {name} must be a JSON object, got {type(args).__name__}')
  return ToolCall(name, args)  # other keys (an id, say) are ignored


_FENCE = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL)


def _bare_call(text: str) -> ToolCall | None:
  """An untagged output that is exactly one call object (see the module docstring)."""
  body = text.strip()
  if m := _FENCE.match(body):
    body = m.group(1)
  if not body.startswith("{"):
    return None
  try:
    obj = json.loads(body)
  except json.JSONDecodeError:
    return None
  if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
    return None
  if set(obj) - {"name", "arguments"}:
    return None
  call = _read_call(body)
  return call if isinstance(call, ToolCall) else None


def parse_output(text: str) -> ParsedOutput:
  """Reads the tool calls out of one output (never raises)."""
  if OPEN not in text and CLOSE not in text and (bare := _bare_call(text)):
    return ParsedOutput((bare,), "")
  calls: list[ToolCall | Malformed] = []
  outside, at = [], 0
  for m in _BLOCK.finditer(text):
    outside.append(text[at : m.start()])
    calls.append(_read_call(m.group(1).strip()))
    at = m.end()
  rest = text[at:]
  if OPEN in rest:
    calls.append(Malformed(f"a {OPEN} is never closed with {CLOSE}"))
    rest = rest[: rest.index(OPEN)]
  outside.append(rest)
  thought = "".join(outside)
  if CLOSE in thought:
    calls.append(Malformed(f"a {CLOSE} has no {OPEN} before it"))
    thought = thought.replace(CLOSE, "")
  return ParsedOutput(tuple(calls), thought.strip())


def malformed_observation(reason: str) -> str:
  return f"Error: malformed tool call: {reason}. Write a call as:\n{CALL_EXAMPLE}"


class ChatFormat:
  """Renders an agent's turns with a tokenizer's chat template (see the module docstring).

  Args:
    tokenizer: a `psynth_jax.tokenizer.Tokenizer` with a chat template.
    tools: the tool schemas (`Toolbox.schemas()`); none: a plain chat.
  """

  def __init__(self, tokenizer, tools: Sequence[dict] = ()):
    self.tokenizer = tokenizer
    self.tools = list(tools)
    probe = [{"role": "user", "content": "?"}]
    self.native_tools = bool(self.tools) and OPEN in tokenizer.apply_chat_template(
      probe, tools=self.tools
    )
    try:
      self._after(["?"], "tool")
      self.observation_role = "tool"
    except jinja2.exceptions.TemplateError:  # no tool role: observations as one user message
      self.observation_role = "user"

  def call_opener_ids(self) -> tuple[int, ...]:
    """The token that opens a tool call (`OPEN`), to ban it on a turn without calls.

    Raises:
      ValueError: `OPEN` is not one token of this tokenizer (banning a piece of it would
        ban ordinary text too).
    """
    ids = tuple(self.tokenizer.encode(OPEN))
    if len(ids) != 1:
      raise ValueError(
        f"{OPEN!r} is {len(ids)} tokens {list(ids)} in this tokenizer, not one: a turn"
        " without tool calls cannot ban it"
      )
    return ids

  def prompt(self, messages: Sequence[dict]) -> list[int]:
    """The first turn: messages ({"role", "content"}) rendered with the tools, then the
    generation prompt."""
    messages = [dict(m) for m in messages]
    if self.tools and not self.native_tools:
      note = tool_instructions(self.tools)
      if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{note}"
      else:
        messages.insert(0, {"role": "system", "content": note})
    tools = self.tools if self.native_tools else None
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    return self.tokenizer.encode(text)

  def _after(self, observations: Sequence[str], role: str) -> str:
    if role == "tool":
      turns = [{"role": "tool", "content": o} for o in observations]
    else:
      body = "\n".join(f"<tool_response>\n{o}\n</tool_response>" for o in observations)
      turns = [{"role": "user", "content": body}]
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _MARK}, *turns]
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if text.count(_MARK) != 1:
      raise ValueError("the chat template does not write an assistant message's content once")
    return text[text.index(_MARK) + len(_MARK) :]

  def observations(self, observations: Sequence[str]) -> list[int]:
    """The text after an output: end of turn, the observations, the next generation prompt."""
    return self.tokenizer.encode(self._after(observations, self.observation_role))

  def decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(ids)
