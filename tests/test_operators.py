"""Merge operators (`psynth_jax/operators`): one interface, each operator's own invariants.

* `merge=Reencode(m)` is exactly `mapper=m` (the shorthand), in every entry point.
* Order-free operators give the same logits for permuted branches.
* `sequential`: branch i's merged keys equal a fresh prefill of its tokens at
  positions sum_{j<i} len_j + t; the synthesizer starts at sum_i len_i; one branch
  is the shared-start path.
* Every operator: a batch of problems equals each problem alone.
* `recompute`: fraction 0 is the paper's path; 1 is a forward of the concatenated
  branch tokens at the PS positions; in between, the chosen rows are the top layer-1
  deviations and equal a token-by-token recompute over the cache path.
* `ape`: 1 / 1 is the paper's path; scale 2 weighs each branch row as two copies of
  it (through the decode); temperature T is the branch keys divided by T.
* `reprefill`: worker-encoded branches re-prefilled == their outputs encoded alone.
* Bad input: unknown names, both `mapper=` and `merge=`, a mapper of another depth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax import merge as merge_lib
from psynth_jax import operators
from psynth_jax.eval.ttft import prefill_flops
from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.model.transformer import forward, hidden_states
from psynth_jax.operators.recompute import recompute_slots
from psynth_jax.operators.reencode import ROPE_FLOPS
from psynth_jax.synthesis import synthesis_logits, synthesize
from psynth_jax.synthesis_batch import synthesize_batch
from psynth_jax.testing import random_params, tiny_config
from psynth_jax.workers import encode_branches, worker_branches

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


NON_IDENTITY = {"ape": dict(temperature=0.7, scale=1.5)}  # settings that change the cache


@pytest.mark.parametrize("name", operators.names())
def test_order_free_operators_ignore_branch_order(lm, branches, name):
  op = operators.create(name, CONFIG, **NON_IDENTITY.get(name, {}))
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
      got = np.asarray(cache.k[layer][0, :, before : before + n])
      np.testing.assert_allclose(got, np.asarray(fresh.k[layer][0]), atol=ATOL)
      got = np.asarray(cache.v[layer][0, :, before : before + n])
      np.testing.assert_allclose(got, np.asarray(fresh.v[layer][0]), atol=ATOL)
    before += n
  assert bool(cache.valid[0, :before].all()) and not bool(cache.valid[0, before:].any())


def test_one_branch_sequential_is_the_shared_start(lm):
  one = encode_branches(lm, [TEXTS[1]])
  mapper = random_mapper(seed=2)
  seq = operators.create("sequential", CONFIG, mapper=mapper)
  assert seq.name == "sequential/head_affine"
  np.testing.assert_allclose(logits(lm, one, merge=seq), logits(lm, one, mapper=mapper), atol=ATOL)


@pytest.mark.parametrize(
  "spec",
  ["sequential", "ape:scale=2", "recompute:fraction=0.3", "recompute:fraction=1", "reprefill"],
)
def test_a_batch_equals_each_problem_alone(lm, branches, spec):
  """`synthesize_batch` (what `psynth eval --operator` runs) vmaps the operator's merge."""
  op = operators.from_spec(spec, CONFIG)
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


# ---------------------------------------------------------------- selective recompute
ROWS = 32  # the bucket of the 20 branch tokens
PS_POSITIONS = np.concatenate([np.arange(len(t)) for t in TEXTS])
CONCAT = sum(TEXTS, [])


def paper_cache(lm, branches, capacity):
  return operators.create("reencode", CONFIG).merge(
    lm.params, branches, rows=ROWS, capacity=capacity
  )


def fresh_cache(lm, tokens, positions):
  """Keys/values of a causal forward over `tokens` at `positions` (one sequence)."""
  n = len(tokens)
  _, cache = hidden_states(
    lm.params, jnp.asarray([tokens]), jnp.asarray([positions]), KVCache.empty(CONFIG, 1, n)
  )
  return cache


def test_recompute_nothing_is_the_paper_path(lm, branches):
  op = operators.create("recompute", CONFIG, fraction=0.0)
  got = op.merge(lm.params, branches, rows=ROWS, capacity=40)
  for a, b in zip(
    jax.tree.leaves(got), jax.tree.leaves(paper_cache(lm, branches, 40)), strict=True
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert op.flops(CONFIG, branches) == operators.create("reencode", CONFIG).flops(CONFIG, branches)


def test_recompute_everything_is_the_concatenated_forward(lm, branches):
  op = operators.create("recompute", CONFIG, fraction=1.0)
  got = op.merge(lm.params, branches, rows=ROWS, capacity=40)
  want = fresh_cache(lm, CONCAT, PS_POSITIONS)
  n = len(CONCAT)
  for layer in range(CONFIG.num_layers):
    np.testing.assert_allclose(got.k[layer][0, :, :n], want.k[layer][0], atol=ATOL)
    np.testing.assert_allclose(got.v[layer][0, :, :n], want.v[layer][0], atol=ATOL)
  np.testing.assert_array_equal(np.asarray(got.positions[0, :n]), PS_POSITIONS)
  # The synthesizer over it == one forward of [branch tokens, prompt] at the PS positions.
  start = max(map(len, TEXTS))
  positions = np.concatenate([PS_POSITIONS, start + np.arange(len(PROMPT))])
  full = forward(lm.params, jnp.asarray([CONCAT + PROMPT]), jnp.asarray([positions]))[0][0]
  np.testing.assert_allclose(logits(lm, branches, merge=op), full[n:], atol=1e-4)
  # Order-dependent, as documented: another branch order is another context.
  assert not np.allclose(
    logits(lm, branches, merge=op), logits(lm, branches.take([2, 0, 1]), merge=op)
  )


def test_recompute_a_fraction_equals_token_by_token_recompute(lm, branches):
  """Each chosen row, in merged order, recomputed over the rows before it (reused or
  already recomputed) by the plain cache path; the other rows are reused untouched."""
  op = operators.create("recompute", CONFIG, fraction=0.3)
  slots = recompute_slots(0.3, ROWS)
  work = paper_cache(lm, branches, ROWS + slots)
  tokens = merge_lib.packed(branches.tokens, branches.lengths, ROWS)[0]
  chosen, use = op.selected(lm.params, work, tokens, ROWS)
  chosen = [int(c) for c, u in zip(np.asarray(chosen), np.asarray(use), strict=True) if u]
  assert len(chosen) == int(np.ceil(0.3 * len(CONCAT))) and chosen == sorted(chosen)
  # The selection: the largest layer-1 key + value deviation of a causal forward.
  fresh = fresh_cache(lm, CONCAT, PS_POSITIONS)
  paper = paper_cache(lm, branches, ROWS)
  n = len(CONCAT)
  dev = sum(
    ((np.asarray(f[1][0]) - np.asarray(p[1][0, :, :n])) ** 2).sum(axis=(0, 2))
    for f, p in ((fresh.k, paper.k), (fresh.v, paper.v))
  )
  assert set(chosen) == set(np.argsort(-dev)[: len(chosen)].tolist())
  ref = paper
  for r in chosen:
    ctx = ref.replace(valid=ref.valid & (jnp.arange(ROWS) < r)[None], index=jnp.asarray(r))
    token, position = jnp.asarray([[CONCAT[r]]]), jnp.asarray([[PS_POSITIONS[r]]])
    _, new = hidden_states(lm.params, token, position, ctx)
    ref = ref.replace(
      k=tuple(a.at[0, :, r].set(b[0, :, r]) for a, b in zip(ref.k, new.k, strict=True)),
      v=tuple(a.at[0, :, r].set(b[0, :, r]) for a, b in zip(ref.v, new.v, strict=True)),
    )
  got = op.merge(lm.params, branches, rows=ROWS, capacity=ROWS)
  for layer in range(CONFIG.num_layers):
    np.testing.assert_allclose(got.k[layer][0], ref.k[layer][0], atol=ATOL)
    np.testing.assert_allclose(got.v[layer][0], ref.v[layer][0], atol=ATOL)
  np.testing.assert_array_equal(np.asarray(got.valid), np.asarray(paper.valid))
  # FLOPs: more tokens, more work; everything = the rotation + one forward of every token.
  cost = {
    f: operators.create("recompute", CONFIG, fraction=f).flops(CONFIG, branches)
    for f in (0.15, 0.3, 1.0)
  }
  assert cost[0.15] < cost[0.3] == op.flops(CONFIG, branches)
  head = 2 * CONFIG.hidden_size * CONFIG.vocab_size
  rotate = operators.create("reencode", CONFIG).flops(CONFIG, branches)
  assert cost[1.0] == rotate + prefill_flops(CONFIG, len(CONCAT), 0) - head
  with pytest.raises(ValueError, match="fraction"):
    operators.create("recompute", CONFIG, fraction=1.5)


# ---------------------------------------------------------------- APE
def test_ape_at_one_is_the_paper_path(lm, branches):
  op = operators.create("ape", CONFIG)
  np.testing.assert_array_equal(logits(lm, branches, merge=op), logits(lm, branches))


def test_ape_scale_weighs_a_row_like_copies_of_it(lm, branches):
  """Scale 2 doubles every branch row's softmax weight: the same as each branch twice."""
  op = operators.create("ape", CONFIG, scale=2.0)
  twice = branches.take([0, 1, 2, 0, 1, 2])
  np.testing.assert_allclose(logits(lm, branches, merge=op), logits(lm, twice), atol=ATOL)
  # The bias stays with the branch rows through the whole decode.
  a = synthesize(lm, branches, PROMPT, max_new_tokens=NEW, merge=op)
  assert a.tokens == synthesize(lm, twice, PROMPT, max_new_tokens=NEW).tokens


def test_ape_temperature_divides_the_branch_scores(lm, branches):
  """Temperature T == the branch keys divided by T at the source (RoPE is linear)."""
  op = operators.create("ape", CONFIG, temperature=0.5)
  cooler = branches.replace(
    cache=branches.cache.replace(k=tuple(k / 0.5 for k in branches.cache.k))
  )
  np.testing.assert_allclose(logits(lm, branches, merge=op), logits(lm, cooler), atol=1e-4)
  assert op.name == "ape/t0.5_s1" and op.flops(CONFIG, branches) > 0
  for bad in (dict(temperature=0.0), dict(scale=-1.0), dict(scale=float("nan"))):
    with pytest.raises(ValueError, match="positive"):
      operators.create("ape", CONFIG, **bad)


# ---------------------------------------------------------------- re-prefill
def test_reprefill_drops_the_worker_prompt(lm):
  """Worker rows (after a prompt) re-prefilled == the outputs encoded alone; branches
  encoded alone are unchanged by it."""
  prompts = [[50, 51, 52, 53], [54, 55], [56, 57, 58, 59, 60, 61]]
  worker = worker_branches(lm, prompts, TEXTS)
  alone = encode_branches(lm, TEXTS)
  op = operators.create("reprefill", CONFIG)
  want = logits(lm, alone)
  np.testing.assert_allclose(logits(lm, worker, merge=op), want, atol=ATOL)
  np.testing.assert_allclose(logits(lm, alone, merge=op), want, atol=ATOL)
  assert not np.allclose(logits(lm, worker), want, atol=1e-3)  # the prompt did matter
  assert op.flops(CONFIG, alone) > operators.create("reencode", CONFIG).flops(CONFIG, alone)
  with pytest.raises(NotImplementedError, match="multi-turn"):
    logits(lm, alone.with_spans(), merge=op)
