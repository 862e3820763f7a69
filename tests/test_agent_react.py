"""The ReAct loop and its tool-call format (`psynth_jax/agents/react.py`, `tool_calls.py`).

The loop's logic is driven by a scripted model (it says what the test wants, whatever a
random model would): a malformed call and an exception inside a tool become observations,
the loop stops at the step limit, a final answer ends it. The format is Qwen2.5's, rendered
by its own chat template (tests/fixtures/chat_templates/qwen2_5.jinja, the model's file):
the turns fed one by one are the template's rendering of the whole conversation.
"""

import json
from pathlib import Path

import pytest

from psynth_jax import testing
from psynth_jax.agents.react import LIMIT_NOTE, MAX_STEPS, run_react
from psynth_jax.agents.tool_calls import (
  ChatFormat,
  Malformed,
  ToolCall,
  parse_output,
  tool_instructions,
)
from psynth_jax.agents.tools import Tool, Toolbox
from psynth_jax.tokenizer import Tokenizer

QWEN_TEMPLATE = Path(__file__).parent / "fixtures" / "chat_templates" / "qwen2_5.jinja"


def _add(a: int, b: int) -> int:
  return a + b


def _explode(why: str) -> str:
  raise RuntimeError(f"tool broke: {why}")


TOOLBOX = Toolbox(
  [
    Tool("add", "Add two integers.", {"a": int, "b": int}, _add),
    Tool("explode", "Always fails.", {"why": str}, _explode),
  ]
)
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """(Qwen2.5 template, the tests' tiny template without a tool role) on one BPE vocabulary."""
  root = tmp_path_factory.mktemp("tok")
  tiny = testing.bpe_tokenizer_folder(root / "tiny")
  qwen = testing.bpe_tokenizer_folder(root / "qwen")
  (qwen / "chat_template.jinja").write_text(QWEN_TEMPLATE.read_text())
  return Tokenizer.from_folder(qwen), Tokenizer.from_folder(tiny)


class Scripted:
  """A `TurnModel` that writes the given outputs in order and remembers what it was fed."""

  def __init__(self, tokenizer, outputs):
    self.tokenizer, self.outputs, self.fed = tokenizer, list(outputs), []

  def turn(self, new_ids):
    self.fed.append(self.tokenizer.decode(new_ids, skip_special_tokens=False))
    return self.tokenizer.encode(self.outputs[len(self.fed) - 1])


def call(name, **arguments) -> str:
  return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


# --- the format -------------------------------------------------------------------


def test_calls_are_read_in_order_with_the_thought_outside():
  text = f"I will add.\n{call('add', a=2, b=3)}\n{call('explode', why='x')}"
  parsed = parse_output(text)
  assert parsed.calls == (ToolCall("add", {"a": 2, "b": 3}), ToolCall("explode", {"why": "x"}))
  assert parsed.text == "I will add." and not parsed.is_final
  # Arguments as a JSON string, or absent, are accepted; other keys are ignored.
  body = '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}", "id": "c1"}'
  assert parse_output(f"<tool_call>{body}</tool_call>").calls == (
    ToolCall("add", {"a": 1, "b": 2}),
  )
  assert parse_output('<tool_call>{"name": "now"}</tool_call>').calls == (ToolCall("now", {}),)
  final = parse_output("  The answer is 5.  ")
  assert final.is_final and final.text == "The answer is 5."


@pytest.mark.parametrize(
  "text, reason",
  [
    ("<tool_call>{'name': 'add'}</tool_call>", "not valid JSON"),
    ("<tool_call>[1, 2]</tool_call>", "must be a JSON object"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'no "name"'),
    ('<tool_call>{"name": "add", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "add", "arguments": "1, 2"}</tool_call>', "not a JSON object"),
    ('Let me call <tool_call>{"name": "add", "arguments": {"a"', "never closed"),
    ("done</tool_call>", "no <tool_call> before"),
  ],
)
def test_malformed_calls_are_named_not_raised(text, reason):
  parsed = parse_output(text)
  assert not parsed.is_final
  assert any(isinstance(c, Malformed) and reason in c.reason for c in parsed.calls)


# --- rendering with the model's chat template --------------------------------------


def test_qwen_renders_tools_and_observations_with_its_own_template(tokenizers):
  qwen, _ = tokenizers
  chat = ChatFormat(qwen, TOOLBOX.schemas())
  assert chat.native_tools and chat.observation_role == "tool"
  prompt = qwen.decode(chat.prompt(MESSAGES), skip_special_tokens=False)
  assert prompt == qwen.apply_chat_template(MESSAGES, tools=TOOLBOX.schemas())
  assert "<tools>" in prompt and json.dumps(TOOLBOX.schemas()[0]) in prompt
  after = qwen.decode(chat.observations(["5", "oops"]), skip_special_tokens=False)
  assert after == (
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response>\n<tool_response>\noops"
    "\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
  )


def test_a_template_without_tools_gets_the_format_in_its_system_message(tokenizers):
  _, tiny = tokenizers
  chat = ChatFormat(tiny, TOOLBOX.schemas())
  assert not chat.native_tools and chat.observation_role == "user"
  prompt = tiny.decode(chat.prompt(MESSAGES), skip_special_tokens=False)
  note = tool_instructions(TOOLBOX.schemas())
  assert prompt.count("<|im_start|>system") == 1 and prompt.count("# Tools") == 1
  assert f"<|im_start|>system\n{note}<|im_end|>\n<|im_start|>user\n" in prompt
  after = tiny.decode(chat.observations(["5"]), skip_special_tokens=False)
  assert after == (
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n"
  )


# --- the loop ---------------------------------------------------------------------


def test_a_tool_step_then_an_answer_is_the_templates_whole_conversation(tokenizers):
  qwen, _ = tokenizers
  chat = ChatFormat(qwen, TOOLBOX.schemas())
  outputs = [f"Adding.\n{call('add', a=2, b=3)}", "The answer is 5."]
  model = Scripted(qwen, outputs)
  episode = run_react(model, chat, MESSAGES, TOOLBOX)
  assert episode.stopped == "answer" and episode.answer == "The answer is 5."
  (step,) = episode.steps
  assert step.thought == "Adding." and step.calls == (ToolCall("add", {"a": 2, "b": 3}),)
  assert step.observations[0].text == "5" and not step.observations[0].error
  assert episode.num_tool_calls == 1 and len(episode.outputs) == 2
  # Fed turn by turn (the outputs as the model wrote them) == the whole chat rendered at once.
  fed = model.fed[0] + outputs[0] + model.fed[1] + outputs[1]
  whole = MESSAGES + [
    {"role": "assistant", "content": outputs[0]},
    {"role": "tool", "content": "5"},
    {"role": "assistant", "content": outputs[1]},
  ]
  rendered = qwen.apply_chat_template(whole, tools=TOOLBOX.schemas(), add_generation_prompt=False)
  assert rendered == fed + "<|im_end|>\n"


def test_malformed_calls_and_tool_exceptions_become_observations(tokenizers):
  qwen, _ = tokenizers
  chat = ChatFormat(qwen, TOOLBOX.schemas())
  outputs = [
    '<tool_call>{"name": "add", "arguments": {"a": 2,}}</tool_call>',  # bad JSON
    call("explode", why="test"),  # the tool raises
    call("add", a="2", b=3) + call("nope"),  # a mistyped argument, an unknown tool
    "<tool_call>" + '{"name": "add"',  # cut off mid-call
    "5",
  ]
  model = Scripted(qwen, outputs)
  episode = run_react(model, chat, MESSAGES, TOOLBOX)
  assert episode.stopped == "answer" and episode.answer == "5" and len(episode.steps) == 4
  observations = [o for s in episode.steps for o in s.observations]
  assert all(o.error for o in observations) and len(observations) == 5
  texts = [o.text for o in observations]
  assert texts[0].startswith("Error: malformed tool call: the call is not valid JSON")
  assert "explode raised RuntimeError: tool broke: test" in texts[1]
  assert "argument 'a' must be integer" in texts[2] and "no tool named 'nope'" in texts[3]
  assert "never closed" in texts[4]
  for step, fed in zip(episode.steps, model.fed[1:], strict=True):  # each was shown to the agent
    for o in step.observations:
      assert f"<tool_response>\n{o.text}\n</tool_response>" in fed


def test_the_loop_stops_at_the_step_limit(tokenizers):
  qwen, _ = tokenizers
  chat = ChatFormat(qwen, TOOLBOX.schemas())
  runs = []
  box = Toolbox([Tool("add", "Add.", {"a": int, "b": int}, lambda a, b: runs.append(a) or a + b)])
  model = Scripted(qwen, [call("add", a=i, b=1) for i in range(20)])
  episode = run_react(model, chat, MESSAGES, box)
  assert MAX_STEPS == 5 and runs == [0, 1, 2, 3, 4]  # the sixth output's call is not run
  assert episode.stopped == "step_limit" and len(episode.steps) == 5 and len(model.fed) == 6
  assert LIMIT_NOTE in model.fed[5] and all(LIMIT_NOTE not in f for f in model.fed[:5])
  assert episode.answer == ""  # the calls are dropped from the answer
  # No tool steps allowed: the first output is the answer.
  none = run_react(Scripted(qwen, [call("add", a=1, b=1)]), chat, MESSAGES, box, max_steps=0)
  assert none.stopped == "step_limit" and none.steps == [] and runs == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError, match="max_steps"):
    run_react(model, chat, MESSAGES, box, max_steps=-1)


def test_the_tiny_template_runs_the_same_loop(tokenizers):
  _, tiny = tokenizers
  chat = ChatFormat(tiny, TOOLBOX.schemas())
  model = Scripted(tiny, [call("add", a=20, b=22), "42"])
  episode = run_react(model, chat, MESSAGES, TOOLBOX)
  assert episode.answer == "42" and episode.steps[0].observations[0].text == "42"
  assert "<|im_start|>user\n<tool_response>\n42\n</tool_response>" in model.fed[1]


def test_an_untagged_call_object_is_one_call_and_other_json_is_an_answer():
  bare = '{"name": "search", "arguments": {"query": "Vaxtrix Guild", "k": 1}}'
  for text in (bare, f"  {bare}\n", f"```json\n{bare}\n```"):
    parsed = parse_output(text)
    assert parsed.calls == (ToolCall("search", {"query": "Vaxtrix Guild", "k": 1}),)
  # Anything more than the object alone, or an object with other keys, is an answer.
  for text in (f"I would call {bare}", '{"name": "Ada", "age": 36}', '{"answer": 4}', "[1, 2]"):
    assert parse_output(text).is_final, text


class Recording(Scripted):
  """`Scripted`, also remembering the ids each turn was told never to sample."""

  def __init__(self, tokenizer, outputs):
    super().__init__(tokenizer, outputs)
    self.banned = []

  def turn(self, new_ids, banned=()):
    self.banned.append(tuple(banned))
    return super().turn(new_ids)


def _with_call_tokens(tmp_path):
  """The Qwen-template tokenizer with `<tool_call>` / `</tool_call>` as single added tokens,
  as in Qwen2.5's own vocabulary."""
  import tokenizers

  folder = testing.bpe_tokenizer_folder(tmp_path / "calls")
  (folder / "chat_template.jinja").write_text(QWEN_TEMPLATE.read_text())
  backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  backend.add_tokens(["<tool_call>", "</tool_call>"])
  backend.save(str(folder / "tokenizer.json"))
  return Tokenizer.from_folder(folder)


def test_a_last_turn_without_calls_bans_the_opener_and_keeps_the_text(tmp_path, tokenizers):
  tok = _with_call_tokens(tmp_path)
  chat = ChatFormat(tok, TOOLBOX.schemas())
  (opener,) = chat.call_opener_ids()
  assert tok.encode("<tool_call>") == [opener]
  bare = json.dumps({"name": "VACUUM"})  # a label written as a call: the 0.5B's habit
  outputs = [call("add", a=i, b=1) for i in range(MAX_STEPS)] + [bare]
  model = Recording(tok, outputs)
  episode = run_react(model, chat, MESSAGES, TOOLBOX, final_without_calls=True)
  assert episode.stopped == "step_limit" and len(episode.steps) == MAX_STEPS
  assert model.banned == [()] * MAX_STEPS + [(opener,)]
  assert episode.answer == bare  # the whole last output, not its calls dropped
  # Without the flag: no ban, and the bare call is dropped from the answer (as before).
  model = Recording(tok, outputs)
  assert run_react(model, chat, MESSAGES, TOOLBOX).answer == ""
  assert model.banned == [()] * (MAX_STEPS + 1)
  # An answer before the limit is the same either way.
  model = Recording(tok, ["5"])
  assert run_react(model, chat, MESSAGES, TOOLBOX, final_without_calls=True).answer == "5"
  # A tokenizer where the opener is several tokens cannot ban it: refused before any turn.
  qwen, _ = tokenizers
  with pytest.raises(ValueError, match="not one"):
    run_react(
      Recording(qwen, ["5"]),
      ChatFormat(qwen, TOOLBOX.schemas()),
      MESSAGES,
      TOOLBOX,
      final_without_calls=True,
    )
