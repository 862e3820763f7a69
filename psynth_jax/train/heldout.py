"""Held-out cross-entropy: the cache synthesizer against the text teacher, on the same targets.

For validation traces (a stage-1 or stage-2 `validation.jsonl`), each example's mean
cross-entropy per target token under

- the cache synthesizer of an arm (an adapter's mapper + LoRA over the merged branch
  caches, exactly the training step's forward; the untrained arm is the naive merge:
  no mapper, no LoRA), and
- the text-concatenation synthesizer (the base model reading the branches pasted as
  text: the training step's teacher), and that synthesizer with the LoRA of a text arm
  (`train.path="text"`: the control trained on the same targets),

grouped by the trace's task (the stage-1 route or stage-2 problem set). It is cheap,
needs no generation, and is readable at every scale: how far an arm's cache
synthesizer is from reading the branches as text, per route.

  python experiments/heldout_ce.py --config psynth_jax/configs/qwen2_5_coder_0_5b.py:stage1 \
    --jsonl runs/stage1/validation.jsonl --adapter ps=runs/train/stage1/export \
    --text-adapter text_lora=runs/train/stage1_text/export

Examples over the config's budgets (`batch`, with the teacher's `teacher_tokens`) are
skipped by the batcher and counted, never truncated.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psynth_jax.model.transformer import Params, unembed
from psynth_jax.synthesis import latent_hidden
from psynth_jax.train import batching, losses
from psynth_jax.train.batching import Batch
from psynth_jax.train.step import encode_branch_batch, text_hidden


def _per_example(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Summed CE over each example's weighted target tokens [B] (nats)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(ce * weights, -1)


@functools.partial(jax.jit, static_argnames=("rows", "prompt_tokens"))
def synthesizer_ce(base: Params, mapper, lora, batch: Batch, rows: int, prompt_tokens: int):
  """The cache synthesizer's summed target CE per example [B]: the training step's forward."""
  branches = encode_branch_batch(
    base, batch.branch_tokens, batch.branch_mask, batch.branch_start, prompt_tokens
  )
  x = latent_hidden(base, branches, batch.tokens, batch.mask, mapper, lora, rows, batch.num_workers)
  logits = unembed(base, losses.gather_positions(x, batch.score_pos), lora)
  return _per_example(logits, batch.labels, batch.weights)


@jax.jit
def text_ce(base: Params, batch: Batch, lora=None):
  """The text synthesizer's summed target CE per example [B]: the base over the pasted text,
  with a text arm's LoRA (None: the untrained text teacher)."""
  logits = unembed(base, text_hidden(base, batch, lora), lora)
  return _per_example(logits, batch.labels, batch.weights)


def evaluate(
  base: Params,
  batcher: batching.Batcher,
  examples: Sequence[Mapping[str, Any]],
  arms: Mapping[str, tuple[Any, Any]],
  *,
  text_arms: Mapping[str, Any] | None = None,
  batch_size: int = 2,
  progress: bool = True,
) -> dict[str, Any]:
  """Per task and arm: mean target CE per token of the cache synthesizer, and the teacher's.

  Args:
    base: the frozen base model.
    batcher: its `Batcher` (the spec must have `teacher_tokens` > 0).
    examples: validation traces.
    arms: name -> (mapper or None, LoRA or None); ("naive_merge": (None, None)).
    text_arms: name -> LoRA of a text arm, run on the text synthesizer.

  Returns:
    {"tasks": {task: {"examples", "tokens", "text", arm: ..., text arm: ...}},
    "skipped": {reason: n}},
    CE in nats per target token (the tokens of all a task's examples pooled).
  """
  from tqdm.auto import tqdm

  spec = batcher.spec
  if not spec.teacher_tokens:
    raise ValueError("held-out CE needs the text teacher: set batch.teacher_tokens > 0")
  text_arms = dict(text_arms or {})
  names = set(arms) | set(text_arms)
  if clash := (set(arms) & set(text_arms)) | (names & {"text", "examples", "tokens"}):
    raise ValueError(f"arm names must be distinct and not 'text'/'examples'/'tokens': {clash}")
  sums: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  skipped: collections.Counter[str] = collections.Counter()
  kept = []
  for ex in examples:
    _, reason = batcher.encode(ex)
    if reason:
      skipped[reason] += 1
    else:
      kept.append(ex)
  total = len(kept) * (len(arms) + len(text_arms))
  bar = tqdm(total=total, desc="held-out CE", disable=not progress)
  for start in range(0, len(kept), batch_size):
    chunk = kept[start : start + batch_size]
    batch, _ = batcher(chunk, batch_size)
    tokens = np.asarray(batch.weights).sum(-1)
    jbatch = jax.tree.map(jnp.asarray, batch)
    for i, ex in enumerate(chunk):
      sums[ex["task"]]["examples"] += 1
      sums[ex["task"]]["tokens"] += float(tokens[i])
    teacher = np.asarray(text_ce(base, jbatch))
    for name, lora in text_arms.items():
      student = np.asarray(text_ce(base, jbatch, lora))
      for i, ex in enumerate(chunk):
        sums[ex["task"]][name] += float(student[i])
      bar.update(len(chunk))
    for name, (mapper, lora) in arms.items():
      rows, prompt = spec.branch_rows, spec.worker_prompt_tokens
      student = np.asarray(synthesizer_ce(base, mapper, lora, jbatch, rows, prompt))
      for i, ex in enumerate(chunk):
        sums[ex["task"]][name] += float(student[i])
      bar.update(len(chunk))
    for i, ex in enumerate(chunk):
      sums[ex["task"]]["text"] += float(teacher[i])
  bar.close()
  tasks = {}
  for task, s in sorted(sums.items()):
    n = max(s["tokens"], 1.0)
    tasks[task] = {"examples": int(s["examples"]), "tokens": int(s["tokens"])}
    tasks[task]["text"] = s["text"] / n
    tasks[task].update({name: s[name] / n for name in [*text_arms, *arms]})
  return {"tasks": tasks, "skipped": dict(skipped)}


def format_table(result: Mapping[str, Any], arms: Sequence[str]) -> str:
  """A markdown table: task, examples, target tokens, text CE, each arm's CE and gap."""
  head = "| task | examples | target tokens | text teacher | " + " | ".join(arms) + " |"
  lines = [head, "|" + "---|" * (4 + len(arms))]
  for task, r in result["tasks"].items():
    cells = [f"{r[a]:.3f} ({r[a] - r['text']:+.3f})" for a in arms]
    lines.append(
      f"| {task} | {r['examples']} | {r['tokens']} | {r['text']:.3f} | " + " | ".join(cells) + " |"
    )
  if result["skipped"]:
    lines.append(f"\nskipped (over budget): {result['skipped']}")
  lines.append("\nnats per target token; in parentheses the arm minus the text teacher.")
  return "\n".join(lines)
