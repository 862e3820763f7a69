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
    "skipped": {reason: n}, "examples": [{"id", "task", "tokens", "text", arm: ...}]},
    CE in nats per target token (the tokens of all a task's examples pooled); the
    per-example records hold summed nats, so that runs on the same traces pair by id
    (`paired_difference`).
  """
  from tqdm.auto import tqdm

  spec = batcher.spec
  if not spec.teacher_tokens:
    raise ValueError("held-out CE needs the text teacher: set batch.teacher_tokens > 0")
  text_arms = dict(text_arms or {})
  names = set(arms) | set(text_arms)
  reserved = {"text", "examples", "tokens", "id", "task"}
  if clash := (set(arms) & set(text_arms)) | (names & reserved):
    raise ValueError(f"arm names must be distinct and none of {sorted(reserved)}: {clash}")
  sums: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  per_example: list[dict[str, Any]] = []
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
    scores = {"text": np.asarray(text_ce(base, jbatch))}
    for name, lora in text_arms.items():
      scores[name] = np.asarray(text_ce(base, jbatch, lora))
      bar.update(len(chunk))
    for name, (mapper, lora) in arms.items():
      rows, prompt = spec.branch_rows, spec.worker_prompt_tokens
      scores[name] = np.asarray(synthesizer_ce(base, mapper, lora, jbatch, rows, prompt))
      bar.update(len(chunk))
    for i, ex in enumerate(chunk):
      record = {"id": ex["id"], "task": ex["task"], "tokens": float(tokens[i])}
      record.update({name: float(ce[i]) for name, ce in scores.items()})
      per_example.append(record)
      task_sums = sums[ex["task"]]
      task_sums["examples"] += 1
      for name in ("tokens", *scores):
        task_sums[name] += record[name]
  bar.close()
  tasks = {}
  for task, s in sorted(sums.items()):
    n = max(s["tokens"], 1.0)
    tasks[task] = {"examples": int(s["examples"]), "tokens": int(s["tokens"])}
    tasks[task]["text"] = s["text"] / n
    tasks[task].update({name: s[name] / n for name in [*text_arms, *arms]})
  return {"tasks": tasks, "skipped": dict(skipped), "examples": per_example}


def paired_difference(
  a: Sequence[Mapping[str, Any]],
  arm_a: str,
  b: Sequence[Mapping[str, Any]],
  arm_b: str,
  *,
  resamples: int = 10_000,
  seed: int = 0,
) -> dict[str, Any]:
  """Token-weighted CE of `arm_a` minus `arm_b` over the examples both records hold (by id),
  with a 95 % percentile-bootstrap interval over examples.

  `a`, `b`: the "examples" of two `evaluate` results (the same run, or two runs on the
  same traces). Examples must agree on their target tokens (the same budgets).
  """
  by_id = {r["id"]: r for r in b}
  pairs = [(r, by_id[r["id"]]) for r in a if r["id"] in by_id]
  if not pairs:
    raise ValueError("the two records share no example id")
  if bad := [ra["id"] for ra, rb in pairs if ra["tokens"] != rb["tokens"]]:
    raise ValueError(f"examples {bad[:5]} have other target token counts in the two records")
  tokens = np.asarray([ra["tokens"] for ra, _ in pairs])
  diff = np.asarray([ra[arm_a] - rb[arm_b] for ra, rb in pairs])  # summed nats per example
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(pairs), (resamples, len(pairs)))
  boot = diff[picks].sum(-1) / tokens[picks].sum(-1)
  lo, hi = np.percentile(boot, [2.5, 97.5])
  return {
    "examples": len(pairs),
    "tokens": int(tokens.sum()),
    "difference": float(diff.sum() / tokens.sum()),
    "interval": [float(lo), float(hi)],
  }


def format_table(result: Mapping[str, Any], arms: Sequence[str]) -> str:
  """A markdown table: task, examples, target tokens, text CE, each arm's CE and gap; then
  each arm against the text teacher over all examples, with its paired 95 % interval."""
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
  if examples := result.get("examples"):
    for arm in arms:
      d = paired_difference(examples, arm, examples, "text")
      lo, hi = d["interval"]
      lines.append(
        f"{arm} - text teacher, all {d['examples']} examples (token-weighted):"
        f" {d['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired bootstrap, 95 %)"
      )
  return "\n".join(lines)
