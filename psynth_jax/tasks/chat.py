"""Chat prompts for instruction-tuned models: any question, rendered by the model's chat template.

The same question is restated in every prompt, as the paper does: worker i is
asked to work on it from one angle, the cache synthesizer is told that it is
given latent information from previous agents, and the text synthesizer sees
"[Worker i]: <output>" blocks.

Two registered tasks use these prompts:

* `chat`: questions from a JSONL file of `Problem.to_json` rows
  ({"id", "question", "answer", "meta"}; `meta.instructions` may add one line
  per worker), or built in code (`Problem(id, question)`, as `psynth run` does);
* `synthetic_chat`: the synthetic suite's problems (`psynth_jax.tasks.synthetic`)
  put to a chat model, scored by the suite's answer match.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from psynth_jax.tasks import synthetic
from psynth_jax.tasks.base import Problem, Task

WORKER_ANGLES = (
  "Solve it step by step and state the answer.",
  "Check the key facts and assumptions, then answer.",
  "Consider an alternative approach, then answer.",
  "List possible pitfalls, then answer.",
)


def _words(text: str) -> str:
  return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class ChatTask(Task):
  """Chat-template prompts; `score` is 1 when the gold answer's words occur in the completion."""

  name = "chat"
  chat = True

  def load(self, path=None, *, split="test", limit=None, seed=0) -> list[Problem]:
    del split, seed  # a file is one split, in file order
    if path is None:
      raise ValueError("the chat task has no built-in problems: give a JSONL path")
    with open(path, encoding="utf-8") as f:
      problems = [Problem.from_json(json.loads(line)) for line in f if line.strip()]
    return problems[:limit]

  def worker_prompts(self, problem, k):
    prompts = []
    instructions = problem.meta.get("instructions", ())
    if instructions and len(instructions) != k:
      raise ValueError(f"problem {problem.id!r} has {len(instructions)} instructions, not {k}")
    for i in range(k):
      angle = WORKER_ANGLES[i % len(WORKER_ANGLES)]
      prompt = f"You are worker {i + 1} of {k}. Task: {problem.question}\n{angle} Be brief."
      prompts.append(f"{prompt}\n{instructions[i]}" if instructions else prompt)
    return prompts

  def single_agent_prompt(self, problem):
    return f"Task: {problem.question}\nGive the answer briefly."

  def text_synthesis_prompt(self, problem, outputs: Sequence[str]):
    blocks = "\n".join(f"[Worker {i + 1}]: {out.strip()}" for i, out in enumerate(outputs))
    return (
      f"Previous agents worked on this task.\n{blocks}\n\n"
      f"Task: {problem.question}\nCombine their work and give the final answer briefly."
    )

  def synth_prompt(self, problem):
    return (
      "You are given latent information from previous agents that worked on this task.\n"
      f"Task: {problem.question}\nCombine their work and give the final answer briefly."
    )

  def target(self, problem):
    if not problem.answer:
      raise ValueError(f"problem {problem.id!r} has no answer to train on")
    return problem.answer

  def score(self, completion, problem):
    gold = _words(problem.answer)
    if not gold:
      raise ValueError(f"problem {problem.id!r} has no answer to score against")
    return float(f" {gold} " in f" {_words(completion)} ")


class SyntheticChatTask(ChatTask):
  """The synthetic suite's problems with chat prompts (each worker also gets its instruction line)."""

  name = "synthetic_chat"
  families = synthetic.FAMILIES

  def load(self, path=None, *, split="test", limit=None, seed=0, **options):
    return synthetic.TASK.load(path, split=split, limit=limit, seed=seed, **options)

  def target(self, problem):
    # No suite end marker: the batcher ends targets with the model's own eos id.
    return synthetic.target_text(synthetic.Example.of(problem), end_marker="")

  def score(self, completion, problem):
    return synthetic.TASK.score(completion, problem)


CHAT = ChatTask()
SYNTHETIC_CHAT = SyntheticChatTask()
