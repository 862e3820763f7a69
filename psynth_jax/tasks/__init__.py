"""Tasks: the datasets and prompt formats that workflows, traces and training run on.

  task = tasks.get("synthetic")
  problems = task.load(split="test", limit=60)
  prompts = task.worker_prompts(problems[0], 3)

A task is a `Task` (`psynth_jax.tasks.base`): its problems, a prompt for every
role, a target and a score. To add one, write `psynth_jax/tasks/<name>.py` with
a `Task` subclass instance and add a line to `_BUILTIN`; code outside the
package calls `register(task)` instead.
"""

from __future__ import annotations

import importlib

from psynth_jax.tasks.base import Problem, Task

# name -> (module, attribute); modules are imported on first use, so that a task's
# data dependencies are only needed when it runs.
_BUILTIN = {
  "synthetic": ("psynth_jax.tasks.synthetic", "TASK"),
  "chat": ("psynth_jax.tasks.chat", "CHAT"),
  "synthetic_chat": ("psynth_jax.tasks.chat", "SYNTHETIC_CHAT"),
  # The paper's benchmarks (`psynth data install` installs their packages).
  "gsm8k": ("psynth_jax.tasks.mathqa", "GSM8K"),
  "aime2024": ("psynth_jax.tasks.mathqa", "AIME2024"),
  "aime2025": ("psynth_jax.tasks.mathqa", "AIME2025"),
  "math500": ("psynth_jax.tasks.mathqa", "MATH500"),
  "gpqa_diamond": ("psynth_jax.tasks.multiple_choice", "GPQA_DIAMOND"),
  "medqa": ("psynth_jax.tasks.multiple_choice", "MEDQA"),
  "mmlu": ("psynth_jax.tasks.multiple_choice", "MMLU"),
  "humaneval": ("psynth_jax.tasks.coding", "HUMANEVAL"),
  "mbpp": ("psynth_jax.tasks.coding", "MBPP"),
  "humaneval_plus": ("psynth_jax.tasks.coding", "HUMANEVAL_PLUS"),
  "mbpp_plus": ("psynth_jax.tasks.coding", "MBPP_PLUS"),
  "gaia": ("psynth_jax.tasks.agents", "GAIA"),
  "marble_db": ("psynth_jax.tasks.agents", "MARBLE_DB"),
  # Stage-2 training problems (`psynth_jax.train.stage2`): in no evaluation set.
  "math_train": ("psynth_jax.tasks.training_problems", "MATH_TRAIN"),
  "mmlu_train": ("psynth_jax.tasks.training_problems", "MMLU_TRAIN"),
  "arith_gym": ("psynth_jax.tasks.training_problems", "ARITH_GYM"),
  # Stage-1 training routes (`psynth_jax.train.stage1`): context chunks as branches.
  "chat_rounds": ("psynth_jax.tasks.chat_rounds", "CHAT_ROUNDS"),
  "retrieved_chunks": ("psynth_jax.tasks.retrieved_chunks", "RETRIEVED_CHUNKS"),
  "tool_calls": ("psynth_jax.tasks.tool_calls", "TOOL_CALLS"),  # ToolTalk
  "bfcl_calls": ("psynth_jax.tasks.tool_calls", "BFCL_CALLS"),  # BFCL multi-turn
  "in_context": ("psynth_jax.tasks.in_context", "IN_CONTEXT"),
  "in_context_inverse": ("psynth_jax.tasks.in_context", "IN_CONTEXT_INVERSE"),
  "gaia_offline": ("psynth_jax.tasks.gaia_offline", "GAIA_OFFLINE"),  # generated, needs tools
  "marble_db_offline": ("psynth_jax.tasks.db_offline", "MARBLE_DB_OFFLINE"),  # PostgreSQL
}
_REGISTERED: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
  """Makes `task` available as `get(task.name)`; a taken name is an error unless `replace`."""
  if not isinstance(task, Task):
    raise TypeError(f"expected a psynth_jax.tasks.Task, got {type(task).__name__}")
  if not task.name:
    raise ValueError(f"{task!r} has no name")
  if not replace and (task.name in _BUILTIN or task.name in _REGISTERED):
    raise ValueError(f"task name {task.name!r} is taken; pass replace=True to override it")
  _REGISTERED[task.name] = task
  return task


def get(name: str) -> Task:
  """The task registered as `name`."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _BUILTIN:
    raise KeyError(f"unknown task {name!r}; registered tasks: {names()}")
  module, attribute = _BUILTIN[name]
  return getattr(importlib.import_module(module), attribute)


def names() -> list[str]:
  return sorted({*_BUILTIN, *_REGISTERED})


__all__ = ["Problem", "Task", "get", "names", "register"]
