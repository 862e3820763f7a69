"""Worker branches: cache rows equal an independent prefill, batching changes nothing.

The branch caches are compared with a plain prefill of [worker prompt + output
tokens] (same positions, rows of the output tokens), and after re-encoding
with a prefill of the same tokens at positions shifted by -|prompt| (re-encoding
must equal recomputing the keys at the new positions: `psynth_jax/merge.py`). A stop id that one worker emits
first gives an empty branch.
"""

import jax
import numpy as np
import pytest

from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel
from psynth_jax.merge import mapped_branch_kv
from psynth_jax.model.transformer import forward
from psynth_jax.testing import random_params, tiny_config
from psynth_jax.workers import encode_branches, run_workers, run_workers_batch, worker_branches

CONFIG = tiny_config(max_position_embeddings=64)
NEW = 6
PREFIX = [7, 31, 2, 44]
SUFFIXES = [[12], [60, 3, 3, 8, 21], [9, 9, 1, 40, 16, 5, 38, 50, 11, 2]]
PROMPTS = [PREFIX + s for s in SUFFIXES]  # lengths 5, 9, 14
ROWS = 32  # rows of the reference prefill
ATOL = 2e-5


@jax.jit
def _prefill(params, tokens, positions, mask):
  """Logits and cache of one right-padded sequence [1, ROWS] written from row 0."""
  return forward(params, tokens, positions, KVCache.empty(params.config, 1, ROWS), mask)


def reference(lm, tokens, start_position=0):
  """(logits [T, V], k, v: L x [G, T, H]) of a plain prefill of `tokens` at start_position + t."""
  n = len(tokens)
  padded = np.zeros((1, ROWS), np.int32)
  padded[0, :n] = tokens
  positions = (np.arange(ROWS, dtype=np.int32) + start_position)[None]
  mask = (np.arange(ROWS) < n)[None]
  logits, cache = _prefill(lm.params, padded, positions, mask)
  k = [np.asarray(kl[0, :, :n]) for kl in cache.k]
  v = [np.asarray(vl[0, :, :n]) for vl in cache.v]
  return np.asarray(logits[0, :n]), k, v


@pytest.fixture(scope="module")
def lm():
  """The model, with a stop id that worker 1 emits first (so branch 1 is empty)."""
  base = LanguageModel(random_params(CONFIG), stop_ids=(), pad_id=0)
  logits, _, _ = reference(base, PROMPTS[1])
  return LanguageModel(base.params, stop_ids=(int(logits[-1].argmax()),), pad_id=0)


@pytest.fixture(scope="module")
def workers(lm):
  return run_workers(lm, PROMPTS, NEW)


def test_outputs_are_greedy_and_cut_at_the_stop_id(lm, workers):
  (stop,) = lm.stop_ids
  assert workers.tokens[1] == []
  for prompt, out in zip(PROMPTS, workers.tokens, strict=True):
    logits, _, _ = reference(lm, prompt + out)
    w, n = len(prompt), len(out)
    # Each output token is the argmax after the previous one ...
    np.testing.assert_array_equal(logits[w - 1 : w - 1 + n].argmax(-1), out)
    # ... none is the stop id, and a short output is one whose next token is the stop id.
    assert stop not in out
    assert n == NEW or logits[w - 1 + n].argmax() == stop


def test_branches_hold_the_output_rows_only(lm, workers):
  br = workers.branches
  assert br.num_branches == 3
  np.testing.assert_array_equal(br.lengths, [len(t) for t in workers.tokens])
  np.testing.assert_array_equal(br.offsets, [len(p) for p in PROMPTS])
  assert not np.asarray(br.cache.valid[1]).any()
  for i, out in enumerate(workers.tokens):
    valid = np.asarray(br.cache.valid[i])
    assert valid[: len(out)].all() and not valid[len(out) :].any()
    np.testing.assert_array_equal(br.tokens[i, : len(out)], out)
    np.testing.assert_array_equal(br.tokens[i, len(out) :], lm.pad_id)


def test_branch_rows_equal_an_independent_prefill(lm, workers):
  br = workers.branches
  reencoded_k, reencoded_v = mapped_branch_kv(br, lm.config, None)
  for i, (prompt, out) in enumerate(zip(PROMPTS, workers.tokens, strict=True)):
    w, n = len(prompt), len(out)
    _, k, v = reference(lm, prompt + out)
    np.testing.assert_array_equal(br.cache.positions[i, :n], w + np.arange(n))
    for layer in range(CONFIG.num_layers):
      np.testing.assert_allclose(br.cache.k[layer][i, :, :n], k[layer][:, w:], atol=ATOL)
      np.testing.assert_allclose(br.cache.v[layer][i, :, :n], v[layer][:, w:], atol=ATOL)
    # Re-encoded by -|W|: the same tokens recomputed at positions -|W| .. -1, 0 .. n-1.
    _, k0, v0 = reference(lm, prompt + out, start_position=-w)
    for layer in range(CONFIG.num_layers):
      np.testing.assert_allclose(reencoded_k[layer][i, :, :n], k0[layer][:, w:], atol=ATOL)
      np.testing.assert_allclose(reencoded_v[layer][i, :, :n], v0[layer][:, w:], atol=ATOL)
  assert sum(len(t) for t in workers.tokens) > NEW  # the comparison covers real rows


def _assert_same_branch(a, i, b, j):
  """Branch i of `a` equals branch j of `b` on their valid rows."""
  n = int(a.lengths[i])
  assert n == int(b.lengths[j]) and int(a.offsets[i]) == int(b.offsets[j])
  np.testing.assert_array_equal(a.tokens[i, :n], b.tokens[j, :n])
  np.testing.assert_array_equal(a.cache.valid[i, :n], b.cache.valid[j, :n])
  np.testing.assert_array_equal(a.cache.positions[i, :n], b.cache.positions[j, :n])
  for ka, kb in zip(a.cache.k + a.cache.v, b.cache.k + b.cache.v, strict=True):
    np.testing.assert_allclose(ka[i, :, :n], kb[j, :, :n], atol=ATOL)


def test_batched_workers_equal_one_at_a_time(lm, workers):
  for i, prompt in enumerate(PROMPTS):
    alone = run_workers(lm, [prompt], NEW)
    assert alone.tokens == [workers.tokens[i]]
    _assert_same_branch(workers.branches, i, alone.branches, 0)


def test_shared_prefix_equals_full_prompts(lm, workers):
  shared = run_workers(lm, SUFFIXES, NEW, shared_prefix=PREFIX)
  assert shared.tokens == workers.tokens
  for i in range(len(PROMPTS)):
    _assert_same_branch(workers.branches, i, shared.branches, i)


def test_encode_branches_rows_equal_a_plain_prefill(lm):
  texts = [PROMPTS[2], [], PROMPTS[0] + [4, 4]]
  br = encode_branches(lm, texts)
  np.testing.assert_array_equal(br.lengths, [14, 0, 7])
  np.testing.assert_array_equal(br.offsets, 0)
  for i, toks in enumerate(texts):
    n = len(toks)
    valid = np.asarray(br.cache.valid[i])
    assert valid[:n].all() and not valid[n:].any()
    np.testing.assert_array_equal(br.tokens[i, :n], toks)
    if n == 0:
      continue
    _, k, v = reference(lm, toks)
    np.testing.assert_array_equal(br.cache.positions[i, :n], np.arange(n))
    for layer in range(CONFIG.num_layers):
      np.testing.assert_allclose(br.cache.k[layer][i, :, :n], k[layer], atol=ATOL)
      np.testing.assert_allclose(br.cache.v[layer][i, :, :n], v[layer], atol=ATOL)
  # A bigger capacity pads more but keeps the rows.
  wide = encode_branches(lm, texts, capacity=32)
  assert wide.capacity == 32
  for i in range(3):
    _assert_same_branch(br, i, wide, i)


def test_branches_take_reorders_every_field(lm):
  br = encode_branches(lm, [PROMPTS[2], [], PROMPTS[0] + [4, 4]])
  taken = br.take([2, 0, 1])
  for new, old in enumerate([2, 0, 1]):
    _assert_same_branch(taken, new, br, old)


def test_bad_inputs_raise_clear_errors(lm):
  with pytest.raises(ValueError, match="at least one"):
    run_workers(lm, [], NEW)
  with pytest.raises(ValueError, match="at least one"):
    encode_branches(lm, [])
  with pytest.raises(ValueError, match="capacity"):
    encode_branches(lm, [list(range(20))], capacity=16)
  with pytest.raises(ValueError, match="token ids"):
    encode_branches(lm, [[1, 2, CONFIG.vocab_size]])
  with pytest.raises(ValueError, match="max_position_embeddings"):
    encode_branches(lm, [[1] * (CONFIG.max_position_embeddings + 1)])
  with pytest.raises(ValueError, match="empty"):
    run_workers(lm, [[1, 2], []], NEW)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    run_workers(lm, [[1] * (CONFIG.max_position_embeddings - 2)], NEW)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    run_workers(lm, [[1] * 30], NEW, shared_prefix=[2] * 30)


def test_recorded_workers_rebuild_the_same_branches(lm):
  # Prefill of prompt + output keeps the rows decode wrote (up to float order).
  prompts = [PREFIX + s for s in SUFFIXES]
  out = run_workers(lm, prompts, NEW)
  rebuilt = worker_branches(lm, prompts, out.tokens)
  b = out.branches
  np.testing.assert_array_equal(rebuilt.lengths, b.lengths)
  np.testing.assert_array_equal(rebuilt.offsets, b.offsets)
  assert rebuilt.fingerprint == b.fingerprint
  for i, n in enumerate(np.asarray(b.lengths)):
    np.testing.assert_array_equal(rebuilt.tokens[i, :n], b.tokens[i, :n])
    np.testing.assert_array_equal(rebuilt.cache.positions[i, :n], b.cache.positions[i, :n])
    for got, want in zip(rebuilt.cache.k + rebuilt.cache.v, b.cache.k + b.cache.v, strict=True):
      np.testing.assert_allclose(got[i, :, :n], want[i, :, :n], atol=2e-5)
  with pytest.raises(ValueError, match="one output per prompt"):
    worker_branches(lm, prompts, out.tokens[:1])


def test_a_batch_of_problems_gives_each_problems_own_workers(lm):
  problems = [[PREFIX + s for s in SUFFIXES], [[5, 6, 7], [8, 9]], [[30, 31, 32, 33]]]
  batched = run_workers_batch(lm, problems, NEW)
  for prompts, got in zip(problems, batched, strict=True):
    want = run_workers(lm, prompts, NEW)
    assert got.tokens == want.tokens
    n = np.asarray(want.branches.lengths)
    np.testing.assert_array_equal(got.branches.lengths, n)
    np.testing.assert_array_equal(got.branches.offsets, want.branches.offsets)
    for i, m in enumerate(n):
      np.testing.assert_allclose(
        got.branches.cache.k[0][i, :, :m], want.branches.cache.k[0][i, :, :m], atol=2e-5
      )
