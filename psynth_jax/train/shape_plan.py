"""A bounded set of batch shapes for a bucketed run: fewer step programs, a little padding.

Bucketed batches (`BatchSpec.bucketed`) take one step program per shape they meet, and
the shapes are a product of seven bucketed sizes: one epoch of SmolLM2's stage-1 traces
at batch 2 meets ~90 of them, and on a 2-core CPU each costs a compilation of about a
minute, as long as the training steps of that epoch together. The batches of a run are
known before it starts (`BatchIterator.global_batches`), so `plan` counts the shapes
they meet and merges them, greedily, into at most `max_shapes` shapes (each the union
of the shapes it took over), choosing at each merge the one that adds the least cost;
`cover` then rounds a batch's shape up to the cheapest planned shape that holds it.
Rounding a shape up adds padding only, so no loss or gradient changes
(tests/test_batching_buckets.py).

The cost of a shape is a FLOP proxy: the tokens a step runs through the model (branches
with their worker prompts, the synthesizer's prompt and target, the teacher's) plus its
attention score entries / (6 * d_model), the ratio of attention's FLOPs per score entry
to a token's matmul FLOPs in a transformer of width d_model (4 d per entry against about
24 d^2 per token).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable

from psynth_jax.train.batching import BatchShape


def cost(shape: BatchShape, d_model: int) -> float:
  """The FLOP proxy of one example of `shape` (see the module docstring)."""
  s = shape
  branch = s.worker_prompt_tokens + s.branch_tokens
  tokens = s.branches * branch + s.synth_tokens + s.teacher_tokens
  scores = s.branches * branch**2 + s.synth_tokens * (s.branch_rows + s.synth_tokens)
  scores += s.teacher_tokens**2
  return tokens + scores / (6 * d_model)


def holds(big: BatchShape, small: BatchShape) -> bool:
  """Whether a batch of shape `small` fits `big` (every size at least as large)."""
  return all(
    a >= b for a, b in zip(dataclasses.astuple(big), dataclasses.astuple(small), strict=True)
  )


def plan(shapes: Iterable[BatchShape], max_shapes: int, d_model: int) -> list[BatchShape]:
  """At most `max_shapes` shapes that hold every one of `shapes` (one per batch of the run),
  merged greedily by the least added cost; sorted by cost."""
  if max_shapes < 1:
    raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
  counts = collections.Counter(shapes)
  while len(counts) > max_shapes:
    keys = list(counts)
    best = None
    for i, a in enumerate(keys):
      for b in keys[i + 1 :]:
        u = a.union(b)
        before = counts[a] * cost(a, d_model) + counts[b] * cost(b, d_model)
        if u in counts and u not in (a, b):
          before += counts[u] * cost(u, d_model)
        moved = counts[a] + counts[b] + (counts[u] if u not in (a, b) else 0)
        added = moved * cost(u, d_model) - before
        if best is None or added < best[0]:
          best = (added, a, b, u)
    _, a, b, u = best
    merged = counts.pop(a) + counts.pop(b) + counts.pop(u, 0)
    counts[u] = merged
  return sorted(counts, key=lambda s: cost(s, d_model))


def cover(shape: BatchShape, planned: list[BatchShape], d_model: int) -> BatchShape:
  """The cheapest planned shape that holds `shape`."""
  fits = [p for p in planned if holds(p, shape)]
  if not fits:
    raise ValueError(
      f"batch shape {shape} fits none of the {len(planned)} planned shapes: the plan was"
      " made from other data (the traces or the batch settings changed)"
    )
  return min(fits, key=lambda p: cost(p, d_model))


def overhead(shapes: Iterable[BatchShape], planned: list[BatchShape], d_model: int) -> float:
  """The cost the plan adds to `shapes` (one per batch), as a fraction: 0.1 = 10 % more."""
  shapes = list(shapes)
  own = sum(cost(s, d_model) for s in shapes)
  rounded = sum(cost(cover(s, planned, d_model), d_model) for s in shapes)
  return rounded / own - 1.0 if own else 0.0
