"""An agent workflow: K worker agents, their memory branches, then a synthesizer agent.

  runs = run_workers(lm, [[Agent(chat, messages_k, toolbox_k) for k in ...] for episode ...])
  latent = run_synthesizer(lm, Agent(chat, synth_messages, toolbox), runs[0].branches,
                           mapper=mapper, lora=lora)
  text = run_synthesizer(lm, Agent(chat, pasted_messages, toolbox))   # runs[0].texts pasted

Workers are the frozen base model, each a ReAct agent on its own conversation; the workers
of several episodes run together, one row each of a batched `CacheSession.text`
(`run_react_batch`). Their branches are the rows their memory mode keeps
(`psynth_jax.agents.memory`). The synthesizer runs the same loop, one episode at a time: over
the merged branches as a persistent latent prefix (`CacheSession.latent`: merged once, every
turn prefills only its own new ids), or, for the text baseline, from the worker texts
pasted into its first prompt, on a cache it also keeps across turns, so that later turns
cost alike on both paths. The pasted texts are the kept tokens' text (`memory_ids`): both
paths read the same tokens. TTFT is the synthesizer's first step (`SynthesizerRun.ttft_s`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from psynth_jax import decode
from psynth_jax.agents.memory import memory_branches, memory_ids
from psynth_jax.agents.react import MAX_STEPS, Agent, Episode, run_react, run_react_batch
from psynth_jax.agents.session import CacheSession, SessionRow
from psynth_jax.workers import Branches


@dataclasses.dataclass
class WorkerRun:
  """One episode's workers."""

  episodes: list[Episode]
  rows: list[SessionRow]  # their conversations (rows of the batched session)
  branches: Branches  # the kept rows of every worker, under `memory`
  texts: list[str]  # the kept tokens' text per worker (what the text baseline pastes)
  memory: str
  seconds: float  # the whole batch's (every episode of the call ran together)


def run_workers(
  lm,
  episodes: Sequence[Sequence[Agent]],
  memory: str = "final",
  *,
  sampling: decode.Sampling = decode.GREEDY,
  seed: int = 0,
  max_steps: int = MAX_STEPS,
  max_new_tokens: int = 256,
  capacity: int = 4096,
  on_step=None,
  final_without_calls: bool = False,
) -> list[WorkerRun]:
  """The worker agents of several episodes, together on one batched session.

  Args:
    lm: the frozen base model (no adapter).
    episodes: per episode, its K workers (`Agent`: chat format with its tools' schemas,
      first messages, tools).
    memory: the memory mode (`memory.MEMORY_MODES`).
    sampling, seed: how workers draw tokens (the batch shares one key per step).
    max_steps, max_new_tokens: per worker turn (`run_react`, `CacheSession`).
    capacity: cache rows of every conversation; a turn takes as many rows as the batch's
      widest input plus its longest output, so allow for the longest conversation.
    on_step: progress callback (`run_react_batch`).
    final_without_calls: a worker's last turn cannot call (`react`'s module docstring).
  """
  if not episodes or not all(episodes):
    raise ValueError("run_workers needs at least one episode, each with at least one worker")
  t0 = time.perf_counter()
  agents = [a for workers in episodes for a in workers]
  session = CacheSession.text(
    lm, max_new_tokens, capacity, batch=len(agents), sampling=sampling, seed=seed
  )
  done = run_react_batch(session, agents, max_steps, on_step, final_without_calls)
  seconds = time.perf_counter() - t0
  runs, b = [], 0
  for workers in episodes:
    rows = [session.row(b + k) for k in range(len(workers))]
    chat = workers[0].chat
    texts = [chat.decode(memory_ids(r, memory)) for r in rows]
    branches = memory_branches(rows, memory)
    runs.append(WorkerRun(done[b : b + len(workers)], rows, branches, texts, memory, seconds))
    b += len(workers)
  return runs


@dataclasses.dataclass
class SynthesizerRun:
  episode: Episode
  session: CacheSession
  ttft_s: float  # the first step: caches ready (or text given as ids) -> first token on host
  total_s: float

  @property
  def prefilled(self) -> int:
    """Tokens the synthesizer prefilled over all its turns (merged branch rows are not)."""
    return self.session.prefilled


def run_synthesizer(
  lm,
  agent: Agent,
  branches: Branches | None = None,
  mapper=None,
  lora=None,
  *,
  max_steps: int = MAX_STEPS,
  max_new_tokens: int = 256,
  capacity: int = 4096,
  rows: int | None = None,
  num_workers: int | None = None,
  final_without_calls: bool = False,
) -> SynthesizerRun:
  """The synthesizer agent: over `branches` as a latent prefix, or (None) the text baseline.

  Args:
    agent: its chat format, first messages (the task's synthesizer prompt, or for the
      baseline the prompt with the worker texts pasted) and tools.
    branches, mapper, lora, rows, num_workers: as for `synthesize`; with `branches` None the
      model (with `lora`, if given) reads only the messages.
    max_steps, max_new_tokens, capacity, final_without_calls: `run_react`, `CacheSession`.
  """
  t0 = time.perf_counter()
  if branches is None:
    session = CacheSession.text(lm, max_new_tokens, capacity, lora=lora)
  else:
    session = CacheSession.latent(
      lm, branches, mapper, lora, max_new_tokens, capacity, rows=rows, num_workers=num_workers
    )
  episode = run_react(
    session, agent.chat, agent.messages, agent.toolbox, max_steps, final_without_calls
  )
  return SynthesizerRun(episode, session, session.turns[0].first_token_s, time.perf_counter() - t0)
