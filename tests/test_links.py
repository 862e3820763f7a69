"""Learned link tokens (`psynth_jax/operators/links.py`).

* Closed links (gate -inf) are the paper's path exactly; open ones change the logits.
  Under `layout="sequential"` closed links are the sequential-positions path, each
  branch's links after it in the end-to-end layout.
* Branch i's link rows equal the link tokens decoded one at a time over the paper's
  merged cache at positions span_i + j (an independent path: token ids, not vectors).
* `embedded=` vectors equal the embedding of the same token ids.
* Empty branches get no links: a batch padded with empty branches equals each problem.
* They train (tests/test_train.py: a step moves the links and the gate; the export loads
  back as the trained operator; a corrupt export is refused by name).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax import merge as merge_lib
from psynth_jax import operators
from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.model.transformer import forward, hidden_states
from psynth_jax.operators.links import GATE_INIT
from psynth_jax.synthesis import synthesis_logits, synthesize
from psynth_jax.synthesis_batch import synthesize_batch
from psynth_jax.testing import random_params, tiny_config
from psynth_jax.workers import encode_branches

CONFIG = tiny_config()
TEXTS = [[4, 8, 15, 16, 23], [42, 1, 2, 3, 5, 8, 13, 21, 34, 55, 7, 7], [9, 60, 11]]
PROMPT = [30, 31, 2, 17, 44, 6]
ATOL = 1e-5


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(random_params(CONFIG), stop_ids=(), pad_id=0)


@pytest.fixture(scope="module")
def branches(lm):
  return encode_branches(lm, TEXTS)


def logits(lm, br, op):
  return np.asarray(synthesis_logits(lm, br, PROMPT, merge=op))


def test_closed_links_are_the_paper_path(lm, branches):
  mapper = Mapper.create("head_affine", CONFIG.num_layers, seed=3)
  op = operators.create("links", CONFIG, mapper=mapper, num_links=3)
  assert op.name == "links3/head_affine" and op.extra_rows(3) == 9
  paper = np.asarray(synthesis_logits(lm, branches, PROMPT, mapper=mapper))
  np.testing.assert_allclose(logits(lm, branches, op.closed()), paper, atol=ATOL)
  opened = op.replace(gate=jnp.zeros(3))
  assert np.abs(logits(lm, branches, opened) - paper).max() > 1e-3
  got = synthesize(lm, branches, PROMPT, max_new_tokens=4, merge=op.closed())
  assert got.tokens == synthesize(lm, branches, PROMPT, mapper, max_new_tokens=4).tokens


def test_closed_sequential_links_are_the_sequential_path(lm, branches):
  mapper = Mapper.create("head_affine", CONFIG.num_layers, seed=3)
  op = operators.create("links", CONFIG, mapper=mapper, num_links=2, layout="sequential")
  assert op.name == "links2_sequential/head_affine" and not op.order_free
  sequential = operators.create("sequential", CONFIG, mapper=mapper)
  want = logits(lm, branches, sequential)
  np.testing.assert_allclose(logits(lm, branches, op.closed()), want, atol=ATOL)
  assert np.abs(logits(lm, branches, op) - want).max() > 1e-4  # open (gate -4): they count
  rows = 32
  got = op.merge(lm.params, branches, rows=rows + op.extra_rows(3), capacity=rows + 16)
  ends = np.cumsum([len(t) for t in TEXTS])
  np.testing.assert_array_equal(
    np.asarray(got.positions[0, rows : rows + 6]), (ends[:, None] + np.arange(2)).reshape(-1)
  )
  assert int(op.start(branches)) == ends[-1]
  with pytest.raises(ValueError, match="layout"):
    operators.create("links", CONFIG, layout="interleaved")


def test_link_rows_equal_decoding_the_links_over_the_merged_cache(lm, branches):
  """Links whose vectors are the embeddings of token ids, against those ids decoded one by
  one over the paper's merged cache, for each branch."""
  ids = [17, 5]
  op = operators.create("links", CONFIG, num_links=2)
  op = op.replace(embeddings=lm.params.module().embed(jnp.asarray(ids)).astype(jnp.float32))
  k, rows = branches.num_branches, 32
  got = op.merge(lm.params, branches, rows=rows + op.extra_rows(k), capacity=rows + 16)
  used = sum(map(len, TEXTS))
  paper = merge_lib.merge(branches, CONFIG, None, rows, rows + len(ids), None)
  for i, text in enumerate(TEXTS):
    cache = paper
    for j, token in enumerate(ids):
      pos = jnp.asarray([[len(text) + j]])
      _, cache = forward(lm.params, jnp.asarray([[token]]), pos, cache)
      row = rows + i * len(ids) + j
      assert int(got.positions[0, row]) == len(text) + j and bool(got.valid[0, row])
      for layer in range(CONFIG.num_layers):
        for have, want in ((got.k, cache.k), (got.v, cache.v)):
          np.testing.assert_allclose(
            np.asarray(have[layer][0, :, row]), np.asarray(want[layer][0, :, rows + j]), atol=ATOL
          )
  np.testing.assert_array_equal(np.asarray(got.valid[0, :rows]), np.arange(rows) < used)
  bias = np.asarray(got.bias[0])
  np.testing.assert_array_equal(bias[rows : rows + 6], np.full(6, GATE_INIT))
  assert not bias[:rows].any() and int(got.index) == rows + 6
  assert int(op.start(branches)) == max(map(len, TEXTS))  # the paper's start


def test_embedded_vectors_are_the_token_path(lm):
  tokens = jnp.asarray([[3, 9, 27, 4]])
  positions = jnp.arange(4)[None]
  want, _ = hidden_states(lm.params, tokens, positions)
  vectors = lm.params.module().embed(tokens)
  got, _ = hidden_states(lm.params, jnp.zeros_like(tokens), positions, embedded=vectors)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_empty_branches_get_no_links(lm, branches):
  """The batch pads the 2-branch problem with an empty branch: its links must not exist."""
  op = operators.create("links", CONFIG, mapper="head_affine", num_links=2, gate=0.0)
  two = encode_branches(lm, [[3, 1, 4, 1, 5], [5, 3]])
  got = synthesize_batch(lm, [branches, two], [PROMPT, [11, 12]], max_new_tokens=4, merge=op)
  for b, prompt, result in zip([branches, two], [PROMPT, [11, 12]], got, strict=True):
    assert result.tokens == synthesize(lm, b, prompt, max_new_tokens=4, merge=op).tokens


def test_bad_links_are_refused(lm, branches):
  with pytest.raises(ValueError, match="num_links"):
    operators.create("links", CONFIG, num_links=0)
  with pytest.raises(ValueError, match="gate"):
    operators.create("links", CONFIG, gate=float("nan"))
  op = operators.create("links", CONFIG)
  with pytest.raises(ValueError, match="hidden size"):
    op.replace(embeddings=jnp.zeros((2, CONFIG.hidden_size + 1))).check(CONFIG)
  with pytest.raises(ValueError, match="cannot hold"):
    synthesize(lm, branches, PROMPT, max_new_tokens=2, merge=op, rows=sum(map(len, TEXTS)))


def test_flops_count_the_link_forward(branches):
  op = operators.create("links", CONFIG, num_links=2)
  naive = operators.create("reencode", CONFIG)
  from psynth_jax.eval.ttft import prefill_flops

  head = 2 * CONFIG.hidden_size * CONFIG.vocab_size
  want = 3 * (prefill_flops(CONFIG, 2, sum(map(len, TEXTS))) - head)
  assert op.flops(CONFIG, branches) - naive.flops(CONFIG, branches) == pytest.approx(want)


def test_kv_rows_of_a_closed_link_are_still_computed(lm, branches):
  """Closing the gate changes only the bias: the rows (what training opens) stay."""
  op = operators.create("links", CONFIG, num_links=2)
  rows = 32 + op.extra_rows(3)
  a = op.merge(lm.params, branches, rows=rows, capacity=rows + 4)
  b = op.closed().merge(lm.params, branches, rows=rows, capacity=rows + 4)
  for x, y in zip(a.k + a.v, b.k + b.v, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert isinstance(a, KVCache) and np.isneginf(np.asarray(b.bias[0, 32:38])).all()
