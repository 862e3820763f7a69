"""Merge operators (`psynth_jax/operators`): one interface, each operator's own invariants.

* `merge=Reencode(m)` is exactly `mapper=m` (the shorthand), in every entry point.
* Order-free operators give the same logits for permuted branches.
* `sequential`: branch i's merged keys equal a fresh prefill of its tokens at
  positions sum_{j<i} len_j + t; the synthesizer starts at sum_i len_i; one branch
  is the shared-start path; a batch equals each problem alone.
* Bad input: unknown names, both `mapper=` and `merge=`, a mapper of another depth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax import operators
from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.model.transformer import hidden_states
from psynth_jax.operators.reencode import ROPE_FLOPS
from psynth_jax.synthesis import synthesis_logits, synthesize, synthesize_batch
from psynth_jax.testing import random_params, tiny_config
from psynth_jax.workers import encode_branches

CONFIG = tiny_config()
TEXTS = [[4, 8, 15, 16, 23], [42, 1, 2, 3, 5, 8, 13, 21, 34, 55, 7, 7], [9, 60, 11]]
PROMPT = [30, 31, 2, 17, 44, 6]
NEW = 5
ATOL = 1e-5


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(random_params(CONFIG), stop_ids=(), pad_id=0)


@pytest.fixture(scope="module")
def branches(lm):
  return encode_branches(lm, TEXTS)


def random_mapper(kind="head_affine", seed=0) -> Mapper:
  """A mapper far from the identity (every parameter random)."""
  mapper = Mapper.create(kind, CONFIG.num_layers, seed=seed)
  leaves, tree = jax.tree.flatten(mapper.state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
  return mapper.replace(state=jax.tree.unflatten(tree, noisy))


def logits(lm, br, **kw):
  return np.asarray(synthesis_logits(lm, br, PROMPT, **kw))


def test_reencode_is_the_mapper_shorthand(lm, branches):
  mapper = random_mapper()
  op = operators.create("reencode", CONFIG, mapper=mapper)
  assert op.name == "reencode/head_affine"
  np.testing.assert_array_equal(logits(lm, branches, merge=op), logits(lm, branches, mapper=mapper))
  a = synthesize(lm, branches, PROMPT, max_new_tokens=NEW, merge=op)
  b = synthesize(lm, branches, PROMPT, mapper, max_new_tokens=NEW)
  assert a.tokens == b.tokens
  naive = operators.create("reencode", CONFIG)
  assert naive.name == "naive_merge"
  np.testing.assert_array_equal(logits(lm, branches, merge=naive), logits(lm, branches))
  fresh = operators.create("reencode", CONFIG, mapper="affine")  # a kind: made at identity
  np.testing.assert_allclose(logits(lm, branches, merge=fresh), logits(lm, branches), atol=ATOL)


@pytest.mark.parametrize("name", [n for n in operators.names()])
def test_order_free_operators_ignore_branch_order(lm, branches, name):
  op = operators.create(name, CONFIG)
  if not op.order_free:
    pytest.skip(f"{name} is documented as order-dependent")
  op = op.replace(mapper=random_mapper(seed=1)) if hasattr(op, "mapper") else op
  order = [2, 0, 1]
  np.testing.assert_allclose(
    logits(lm, branches, merge=op), logits(lm, branches.take(order), merge=op), atol=ATOL
  )


def test_sequential_lays_branches_end_to_end(lm, branches):
  op = operators.create("sequential", CONFIG)
  assert not op.order_free and int(op.start(branches)) == sum(map(len, TEXTS))
  rows = 32
  cache = op.merge(lm.params, branches, rows=rows, capacity=rows + 8)
  before = 0
  for text in TEXTS:
    n = len(text)
    positions = jnp.arange(before, before + n)[None]
    _, fresh = hidden_states(lm.params, jnp.asarray([text]), positions, KVCache.empty(CONFIG, 1, n))
    np.testing.assert_array_equal(np.asarray(cache.positions[0, before : before + n]), positions[0])
    for layer in range(CONFIG.num_layers):
      got = np.asarray(cache.k[layer][0, before : before + n])
      np.testing.assert_allclose(got, np.asarray(fresh.k[layer][0]), atol=ATOL)
      got = np.asarray(cache.v[layer][0, before : before + n])
      np.testing.assert_allclose(got, np.asarray(fresh.v[layer][0]), atol=ATOL)
    before += n
  assert bool(cache.valid[0, :before].all()) and not bool(cache.valid[0, before:].any())


def test_one_branch_sequential_is_the_shared_start(lm):
  one = encode_branches(lm, [TEXTS[1]])
  mapper = random_mapper(seed=2)
  seq = operators.create("sequential", CONFIG, mapper=mapper)
  assert seq.name == "sequential/head_affine"
  np.testing.assert_allclose(logits(lm, one, merge=seq), logits(lm, one, mapper=mapper), atol=ATOL)


def test_sequential_batch_equals_each_problem_alone(lm, branches):
  op = operators.create("sequential", CONFIG)
  problems = [(branches, PROMPT), (encode_branches(lm, [[3, 1, 4, 1, 5], [5, 3]]), [11, 12])]
  got = synthesize_batch(
    lm, [b for b, _ in problems], [p for _, p in problems], max_new_tokens=NEW, merge=op
  )
  for (b, prompt), result in zip(problems, got, strict=True):
    assert result.tokens == synthesize(lm, b, prompt, max_new_tokens=NEW, merge=op).tokens


def test_flops_count_the_rotation_and_the_mapper(branches):
  naive = operators.create("reencode", CONFIG)
  c = CONFIG
  elements = 3 * branches.capacity * c.num_kv_heads * c.head_dim * c.num_layers
  assert naive.flops(CONFIG, branches) == ROPE_FLOPS * elements
  mapped = operators.create("reencode", CONFIG, mapper="head_affine")
  assert mapped.flops(CONFIG, branches) > naive.flops(CONFIG, branches)


def test_bad_operators_are_refused(lm, branches):
  with pytest.raises(ValueError, match="unknown merge operator"):
    operators.create("cacheblend9", CONFIG)
  op = operators.create("reencode", CONFIG)
  with pytest.raises(ValueError, match="not both"):
    synthesize(lm, branches, PROMPT, random_mapper(), max_new_tokens=NEW, merge=op)
  with pytest.raises(TypeError, match="MergeOperator"):
    synthesize(lm, branches, PROMPT, max_new_tokens=NEW, merge="sequential")
  deep = operators.Reencode(Mapper.create("affine", CONFIG.num_layers + 1))
  with pytest.raises(ValueError):
    synthesize(lm, branches, PROMPT, max_new_tokens=NEW, merge=deep)
  with pytest.raises(ValueError, match="already registered"):
    operators.register("reencode")(type("Again", (), {}))
