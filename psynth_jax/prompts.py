"""Prompt templates for chat models (the synthetic suite defines its own in `tasks`).

The same question is restated in every prompt, as the paper does: worker i is
asked to work on it from one angle, the cache synthesizer is told that it is
given latent information from previous agents, and the text synthesizer sees
"[Worker i]: <output>" blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

WORKER_ANGLES = (
  "Solve it step by step and state the answer.",
  "Check the key facts and assumptions, then answer.",
  "Consider an alternative approach, then answer.",
  "List possible pitfalls, then answer.",
)


def worker_message(question: str, index: int, num_workers: int) -> str:
  angle = WORKER_ANGLES[index % len(WORKER_ANGLES)]
  return f"You are worker {index + 1} of {num_workers}. Task: {question}\n{angle} Be brief."


def latent_synth_message(question: str) -> str:
  return (
    "You are given latent information from previous agents that worked on this task.\n"
    f"Task: {question}\nCombine their work and give the final answer briefly."
  )


def text_synth_message(question: str, outputs: Sequence[str]) -> str:
  blocks = "\n".join(f"[Worker {i + 1}]: {out.strip()}" for i, out in enumerate(outputs))
  return (
    f"Previous agents worked on this task.\n{blocks}\n\n"
    f"Task: {question}\nCombine their work and give the final answer briefly."
  )
