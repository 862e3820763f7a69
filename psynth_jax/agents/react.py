"""The ReAct loop: thought / tool call / observation turns, until a final answer or the step limit.

  episode = run_react(model, chat, messages, toolbox, max_steps=5)
  episodes = run_react_batch(session, [Agent(chat, messages, toolbox), ...])  # in lockstep

`model` is anything with `turn(new_ids) -> output ids`: the ids given are appended after
everything it has seen (its own cache) and it decodes one output. The real one is
`psynth_jax.agents.session.CacheSession` (workers, the latent-prefix synthesizer and the
text baseline alike); tests drive the loop with a scripted one.

Turn by turn:
1. the first turn feeds `chat.prompt(messages)` (system prompt, tool schemas, the task);
2. the output is parsed (`tool_calls.parse_output`): no call is the final answer and ends
   the loop;
3. otherwise the turn is one *tool step*: its calls run in order through the toolbox (an
   unknown tool, bad arguments or an exception inside a tool comes back as an error
   observation, `Toolbox.call`; a malformed call gets one too, `malformed_observation`),
   and the next turn feeds the observations (`chat.observations`).
At most `max_steps` tool steps (the reference's 5). The last one's observations end with
`LIMIT_NOTE`, and the next output is the answer whatever it holds: its calls are not run
and `Episode.stopped` is "step_limit". Nothing in the loop raises on what a model writes.
With `final_without_calls`, that last turn cannot call: the tool-call opener is never
sampled (`ChatFormat.call_opener_ids`), and the whole output is the answer, a bare JSON
call included as text (a small model that only knows how to call still names its answer).

`run_react_batch` runs the same loop for many agents (workers of several episodes) on one
batched `CacheSession`: each step, the agents still running take a turn together, the
finished ones sit out; tools run on the host in agent order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

from psynth_jax.agents.tool_calls import (
  ChatFormat,
  Malformed,
  ToolCall,
  malformed_observation,
  parse_output,
)
from psynth_jax.agents.tools import Observation, Toolbox

MAX_STEPS = 5  # the reference's tool-step limit
LIMIT_NOTE = "You have used all your tool calls. Give your final answer now, without tool calls."


class TurnModel(Protocol):
  def turn(self, new_ids: Sequence[int], banned: Sequence[int] = ()) -> Sequence[int]:
    """Reads `new_ids` after everything so far and returns one output's ids (stop excluded),
    never sampling the `banned` ids."""
    ...


@dataclasses.dataclass(frozen=True)
class Step:
  """One tool step: the output, the thought outside its calls, the calls and what they returned."""

  output: str
  thought: str
  calls: tuple[ToolCall | Malformed, ...]
  observations: tuple[Observation, ...]


@dataclasses.dataclass
class Episode:
  """A finished loop. `stopped`: "answer" (an output without calls) or "step_limit"."""

  answer: str
  steps: list[Step]
  stopped: str
  outputs: list[list[int]]  # every turn's output ids, the answer's last

  @property
  def num_tool_calls(self) -> int:
    return sum(len(s.calls) for s in self.steps)


def run_call(toolbox: Toolbox, call: ToolCall | Malformed) -> Observation:
  """One call's observation (never raises)."""
  if isinstance(call, Malformed):
    return Observation(malformed_observation(call.reason), error=True)
  return toolbox.call(call.name, call.arguments)


@dataclasses.dataclass(frozen=True)
class Agent:
  """One agent's setup: its chat format (with its tools' schemas), first messages, tools."""

  chat: ChatFormat
  messages: Sequence[dict]
  toolbox: Toolbox


class _Loop:
  """One agent's loop state: what it feeds next, or its finished Episode."""

  def __init__(self, agent: Agent, max_steps: int, final_without_calls: bool = False):
    if max_steps < 0:
      raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    self.agent, self.max_steps = agent, max_steps
    self.final_without_calls = final_without_calls
    if final_without_calls:
      agent.chat.call_opener_ids()  # refuses a format whose opener is no single token, now
    self.feed: list[int] | None = agent.chat.prompt(agent.messages)
    self.steps: list[Step] = []
    self.outputs: list[list[int]] = []
    self.episode: Episode | None = None

  def consume(self, out: Sequence[int]) -> None:
    """Reads one output: ends the loop, or runs its calls and sets the next feed."""
    chat, toolbox = self.agent.chat, self.agent.toolbox
    self.outputs.append(list(out))
    text = chat.decode(list(out))
    parsed = parse_output(text)
    if parsed.is_final or self.at_limit:
      # At the limit, calls left in the last output are dropped from the answer, not run
      # (with final_without_calls the output is the answer as written).
      stopped = "answer" if parsed.is_final else "step_limit"
      answer = text.strip() if self.final_without_calls and self.at_limit else parsed.text
      self.episode = Episode(answer, self.steps, stopped, self.outputs)
      self.feed = None
      return
    observations = tuple(run_call(toolbox, c) for c in parsed.calls)
    self.steps.append(Step(text, parsed.text, parsed.calls, observations))
    texts = [o.text for o in observations]
    if self.at_limit:
      texts[-1] = f"{texts[-1]}\n\n{LIMIT_NOTE}"
    self.feed = chat.observations(texts)

  @property
  def at_limit(self) -> bool:
    """Whether the next output is the last (every tool step taken)."""
    return len(self.steps) == self.max_steps

  @property
  def banned(self) -> tuple[int, ...]:
    """Ids the next turn must not sample: the call opener on a last turn without calls."""
    if self.final_without_calls and self.at_limit:
      return self.agent.chat.call_opener_ids()
    return ()


def run_react(
  model: TurnModel,
  chat: ChatFormat,
  messages: Sequence[dict],
  toolbox: Toolbox,
  max_steps: int = MAX_STEPS,
  final_without_calls: bool = False,
) -> Episode:
  """Runs one agent until it answers or has taken `max_steps` tool steps (then one last turn).

  Args:
    model: a `TurnModel` (a `CacheSession`, or a scripted stand-in).
    chat: renders the prompt and the observation turns (`ChatFormat`, built with the
      toolbox's schemas).
    messages: the first turn's chat messages (system, user task).
    toolbox: the tools the agent may call.
    max_steps: the most tool steps; 0 lets the agent only answer.
    final_without_calls: the last turn cannot call (see the module docstring).
  """
  loop = _Loop(Agent(chat, messages, toolbox), max_steps, final_without_calls)
  while loop.episode is None:
    banned = loop.banned
    loop.consume(model.turn(loop.feed, banned) if banned else model.turn(loop.feed))
  return loop.episode


def run_react_batch(
  session,
  agents: Sequence[Agent],
  max_steps: int = MAX_STEPS,
  on_step=None,
  final_without_calls: bool = False,
) -> list[Episode]:
  """Runs `len(agents)` agents in lockstep on a batched `CacheSession` (one row each): every
  step, the agents still running take one turn together; each agent's loop is `run_react`'s.
  `on_step(step, running)`, if given, is called after each step with the count still running
  (progress output for long runs).
  """
  if len(agents) != session.batch:
    raise ValueError(f"{len(agents)} agents for a session of batch {session.batch}")
  loops = [_Loop(a, max_steps, final_without_calls) for a in agents]
  step = 0
  while any(loop.episode is None for loop in loops):
    banned = [loop.banned if loop.episode is None else () for loop in loops]
    feeds = [loop.feed for loop in loops]
    outs = session.step(feeds, banned) if any(banned) else session.step(feeds)
    for loop, out in zip(loops, outs, strict=True):
      if out is not None:
        loop.consume(out)
    step += 1
    if on_step is not None:
      on_step(step, sum(loop.episode is None for loop in loops))
  return [loop.episode for loop in loops]
