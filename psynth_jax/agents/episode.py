"""An agent workflow: K worker agents, their memory branches, then a synthesizer agent.

  workers = run_worker_agents(lm, chat, [messages_1, ..., messages_K], toolbox, memory="final")
  latent = run_synthesizer(lm, chat, latent_messages(question), toolbox,
                           branches=workers.branches, mapper=mapper, lora=lora)
  text = run_synthesizer(lm, chat, text_messages(question, workers.texts), toolbox)

Workers are the frozen base model, each a ReAct agent (`run_react`) on its own cache
(`CacheSession.text`); their branches are the rows their memory mode keeps
(`psynth_jax.agents.memory`). The synthesizer runs the same loop: over the merged branches
as a persistent latent prefix (`CacheSession.latent`: merged once, every turn prefills only
its own new ids), or, for the text baseline, from the worker texts pasted into its first
prompt, on a cache it also keeps across turns, so that later turns cost alike on both
paths. The pasted texts are the kept tokens' text (`memory_ids`): both paths read the same
tokens. TTFT is the synthesizer's first step (`SynthesizerRun.ttft_s`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from psynth_jax.agents.memory import memory_branches, memory_ids
from psynth_jax.agents.react import MAX_STEPS, Episode, run_react
from psynth_jax.agents.session import CacheSession
from psynth_jax.agents.tool_calls import ChatFormat
from psynth_jax.agents.tools import Toolbox
from psynth_jax.workers import Branches

LATENT_NOTE = "You are given latent information from previous agents."


def latent_messages(question: str, system: str | None = None) -> list[dict]:
  """The latent synthesizer's first messages: the question, after the merged branches."""
  head = [{"role": "system", "content": system}] if system else []
  return head + [{"role": "user", "content": f"{LATENT_NOTE}\n\n{question}"}]


def text_messages(question: str, worker_texts: Sequence[str], system: str | None = None):
  """The text baseline's first messages: "[Worker i]: <output>" blocks, then the question."""
  blocks = "\n\n".join(f"[Worker {i + 1}]: {t}" for i, t in enumerate(worker_texts))
  head = [{"role": "system", "content": system}] if system else []
  return head + [{"role": "user", "content": f"{blocks}\n\n{question}"}]


@dataclasses.dataclass
class WorkerRun:
  episodes: list[Episode]
  sessions: list[CacheSession]
  branches: Branches  # the kept rows of every worker, under `memory`
  texts: list[str]  # the kept tokens' text per worker (what the text baseline pastes)
  memory: str
  seconds: float


def run_worker_agents(
  lm,
  chat: ChatFormat,
  tasks: Sequence[Sequence[dict]],
  toolbox: Toolbox,
  memory: str = "final",
  *,
  max_steps: int = MAX_STEPS,
  max_new_tokens: int = 256,
  capacity: int = 2048,
) -> WorkerRun:
  """K worker agents, one after another, each on its own cache, and their branches.

  Args:
    lm: the frozen base model (no adapter).
    chat: the chat format (built with `toolbox.schemas()`).
    tasks: each worker's first messages.
    toolbox: the workers' tools.
    memory: the memory mode (`memory.MEMORY_MODES`).
    max_steps, max_new_tokens, capacity: per worker (`run_react`, `CacheSession`).
  """
  t0 = time.perf_counter()
  episodes, sessions = [], []
  for messages in tasks:
    session = CacheSession.text(lm, max_new_tokens, capacity)
    episodes.append(run_react(session, chat, messages, toolbox, max_steps))
    sessions.append(session)
  branches = memory_branches(sessions, memory)
  texts = [chat.decode(memory_ids(s, memory)) for s in sessions]
  return WorkerRun(episodes, sessions, branches, texts, memory, time.perf_counter() - t0)


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
  chat: ChatFormat,
  messages: Sequence[dict],
  toolbox: Toolbox,
  branches: Branches | None = None,
  mapper=None,
  lora=None,
  *,
  max_steps: int = MAX_STEPS,
  max_new_tokens: int = 256,
  capacity: int = 2048,
  rows: int | None = None,
  num_workers: int | None = None,
) -> SynthesizerRun:
  """The synthesizer agent: over `branches` as a latent prefix, or (None) the text baseline.

  Args:
    messages: its first messages (`latent_messages`, or `text_messages` for the baseline).
    branches, mapper, lora, rows, num_workers: as for `synthesize`; with `branches` None the
      base model (`lora` None) reads only `messages`.
    max_steps, max_new_tokens, capacity: `run_react`, `CacheSession`.
  """
  t0 = time.perf_counter()
  if branches is None:
    session = CacheSession.text(lm, max_new_tokens, capacity, lora=lora)
  else:
    session = CacheSession.latent(
      lm, branches, mapper, lora, max_new_tokens, capacity, rows=rows, num_workers=num_workers
    )
  episode = run_react(session, chat, messages, toolbox, max_steps)
  return SynthesizerRun(episode, session, session.turns[0].first_token_s, time.perf_counter() - t0)
