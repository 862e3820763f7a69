"""The binding probe: does a tool value's branch-cache row say which item it belongs to?

On the synthetic suite's `tools` family ("price: apple 4, fig 7") the trained
synthesizer reads a name-keyed fact across branch caches as well as text synthesis
does, but not a lookup by value ("which fruit costs 8?"). Branches are encoded
independently, so whatever binds " 8" to " fig" must already sit in the value
token's own key / value rows. This module measures it: for every value token of
every branch, its rows per layer are the features and its item the label of a
linear probe (ridge regression on one-hot labels, the ridge picked on a validation
part, accuracy on held-out examples).

Two controls make the numbers readable: the item token's own rows (the probe can
read a word off its own row: near 100 %), and chance: 1 / (items per tool) is what
knowing the tool alone gives, 1 / (all items) knowing nothing. Keys are probed before RoPE (rotated back by
their position), so the probe sees content, not where the row sits.

Two encodings of the same branches: `standalone` (each branch text prefilled alone
from position 0, `encode_branches`) and `worker` (the worker's prompt, then its
output, `worker_branches`: the rows the suite's workers hand to the synthesizer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from psynth_jax.model.rope import apply_rope, inv_frequencies

RIDGES = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclasses.dataclass
class Rows:
  """Probe data of one encoding: per layer [N, G*H] keys (pre-RoPE) and values."""

  keys: list[np.ndarray]
  values: list[np.ndarray]
  labels: np.ndarray  # [N] item index
  groups: np.ndarray  # [N] example index (splits never cut an example)


def value_slots(token_texts: Sequence[str], items: Sequence[str]) -> list[tuple[int, int, str]]:
  """(value row, item row, item) for each "item value" pair in a branch's token texts.

  A value is a number token right after an item token (" apple", " 4").
  """
  out = []
  for i in range(1, len(token_texts)):
    item = token_texts[i - 1].strip()
    if re.fullmatch(r" \d+", token_texts[i]) and item in items:
      out.append((i, i - 1, item))
  return out


def _unrotated(k: np.ndarray, positions: np.ndarray, config, layer: int) -> np.ndarray:
  """Keys [S, G, H] rotated back to position 0 (RoPE removed)."""
  return np.asarray(apply_rope(k[None], -positions[None], inv_frequencies(config, layer))[0])


def collect(lm, examples, items: Sequence[str], encoding: str, which: str = "value") -> Rows:
  """Probe rows of every value (or, `which="item"`, item) token of every branch.

  Args:
    lm: the base `LanguageModel` with the suite tokenizer.
    examples: `synthetic.Example`s of the `tools` family.
    items: the item vocabulary (labels are indices into it).
    encoding: "standalone" or "worker" (module docstring).
    which: "value" (the probe) or "item" (the control).
  """
  from psynth_jax.tasks import synthetic
  from psynth_jax.workers import encode_branches, worker_branches

  if encoding not in ("standalone", "worker"):
    raise ValueError(f"encoding must be standalone or worker, got {encoding!r}")
  if which not in ("value", "item"):
    raise ValueError(f"which must be value or item, got {which!r}")
  tok = lm.require_tokenizer()
  config = lm.config
  keys = [[] for _ in range(config.num_layers)]
  values = [[] for _ in range(config.num_layers)]
  labels, groups = [], []
  for n, ex in enumerate(examples):
    outputs = [tok.encode(synthetic.branch_as_output(b)) for b in ex.branches]
    if encoding == "standalone":
      branches = encode_branches(lm, outputs)
    else:
      prompts = [
        tok.encode(synthetic.worker_prompt_text(ex, i), add_special_tokens=True)
        for i in range(len(ex.branches))
      ]
      branches = worker_branches(lm, prompts, outputs)
    positions = np.asarray(branches.cache.positions)
    for b, ids in enumerate(outputs):
      slots = value_slots([tok.decode([i]) for i in ids], items)
      if not slots:
        continue
      rows = [value if which == "value" else item for value, item, _ in slots]
      for layer in range(config.num_layers):
        k = np.asarray(branches.cache.k[layer][b]).transpose(1, 0, 2)  # [S, G, H]
        k = _unrotated(k, positions[b], config, layer)
        keys[layer].append(k[rows].reshape(len(rows), -1))
        v = np.asarray(branches.cache.v[layer][b]).transpose(1, 0, 2)
        values[layer].append(v[rows].reshape(len(rows), -1))
      labels += [items.index(item) for _, _, item in slots]
      groups += [n] * len(slots)
  if not labels:
    raise ValueError("no value tokens found: are these tools examples?")
  return Rows(
    [np.concatenate(x) for x in keys],
    [np.concatenate(x) for x in values],
    np.asarray(labels),
    np.asarray(groups),
  )


def ridge_probe(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
  """Held-out accuracy of a ridge classifier (one-hot targets) from x [N, F] to y [N].

  Examples (groups) are split 60 / 20 / 20 into train / validation / test; the ridge
  with the best validation accuracy is refitted on train + validation.
  """
  rng = np.random.default_rng(seed)
  ids = rng.permutation(np.unique(groups))
  cut = [int(0.6 * len(ids)), int(0.8 * len(ids))]
  part = {g: 0 if i < cut[0] else 1 if i < cut[1] else 2 for i, g in enumerate(ids)}
  split = np.asarray([part[g] for g in groups])
  if not all((split == s).any() for s in range(3)):
    raise ValueError(f"need at least 5 examples to split, got {len(ids)}")
  classes = int(y.max()) + 1
  mean, std = x[split < 2].mean(0), x[split < 2].std(0) + 1e-6
  z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
  onehot = np.eye(classes)[y]

  def fit(mask, ridge):
    a = z[mask]
    return np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ onehot[mask])

  def accuracy(w, mask):
    return float(((z[mask] @ w).argmax(1) == y[mask]).mean())

  scores = {r: accuracy(fit(split == 0, r), split == 1) for r in RIDGES}
  best = max(scores, key=scores.get)
  test = accuracy(fit(split < 2, best), split == 2)
  return {"accuracy": test, "ridge": best, "test_rows": int((split == 2).sum())}


def probe_layers(rows: Rows, seed: int = 0) -> list[dict]:
  """Per layer: held-out accuracy of the probe on keys and on values."""
  out = []
  for layer, (k, v) in enumerate(zip(rows.keys, rows.values, strict=True)):
    key = ridge_probe(k, rows.labels, rows.groups, seed)
    value = ridge_probe(v, rows.labels, rows.groups, seed)
    out.append({"layer": layer, "key": key["accuracy"], "value": value["accuracy"]})
  return out
