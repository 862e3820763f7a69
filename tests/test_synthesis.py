"""Synthesis over merged branch caches: the method's invariants (`psynth_jax/merge.py`, `synthesis.py`).

* One branch, identity mapper, no LoRA == the plain forward over [branch, prompt].
* Branch order, padding buckets and empty branches do not change the logits.
* Zero-initialised mapper / LoRA == the naive merge / the base model.
* `synthesize` greedy tokens == the argmax chain of `synthesis_logits`; fused ==
  two programs; one branch via cache == the same tokens via text.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from psynth_jax.kv_cache import KVCache
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import forward
from psynth_jax.synthesis import synthesis_logits, synthesize, synthesize_text
from psynth_jax.synthesis_batch import synthesize_batch
from psynth_jax.testing import random_params, tiny_config
from psynth_jax.workers import Branches, encode_branches

CONFIG = tiny_config()
TEXTS = [  # branch token lists: lengths 5, 12, 3 (sum 20: one 32-row bucket)
  [4, 8, 15, 16, 23],
  [42, 1, 2, 3, 5, 8, 13, 21, 34, 55, 7, 7],
  [9, 60, 11],
]
PROMPT = [30, 31, 2, 17, 44, 6]  # the synthesizer's own prompt
NEW = 6
ATOL = 1e-4
LORA_CONFIG = LoRAConfig(rank=4, alpha=8.0)


def _replace(state, fn):
  """A copy of an nnx.State with every (name, array) mapped through fn."""
  flat = []
  for path, var in nnx.to_flat_state(state):
    name = ".".join(str(p) for p in path)
    flat.append((path, var.replace(jnp.asarray(fn(name, np.asarray(var[...]))))))
  return nnx.from_flat_state(flat)


def random_mapper(kind: str, seed: int = 0) -> Mapper:
  """A mapper with a non-zero last layer (far from the identity)."""
  rng = np.random.default_rng(seed)
  mapper = Mapper.create(kind, CONFIG.num_layers, seed=seed)
  return mapper.replace(
    state=_replace(mapper.state, lambda n, a: rng.normal(0, 1.0, a.shape).astype(np.float32))
  )


def random_lora(seed: int = 0):
  """LoRA with non-zero B (the default init has B = 0)."""
  rng = np.random.default_rng(seed)
  lora = LoRAWeights.init(CONFIG, LORA_CONFIG, seed=seed)
  return lora.replace(
    state=_replace(
      lora.state,
      lambda n, a: rng.normal(0, 0.3, a.shape).astype(np.float32) if n.startswith("b_") else a,
    )
  )


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(random_params(CONFIG), stop_ids=(), pad_id=0)


@pytest.fixture(scope="module")
def branches(lm):
  return encode_branches(lm, TEXTS)


def logits_of(lm, br, prompt=PROMPT, mapper=None, lora=None) -> np.ndarray:
  return np.asarray(synthesis_logits(lm, br, prompt, mapper=mapper, lora=lora))


def test_one_branch_equals_the_plain_forward(lm):
  """Branch at positions 0..L-1 then the prompt at L.. is exactly a forward over both."""
  br = encode_branches(lm, [TEXTS[1]])
  got = logits_of(lm, br)
  want = np.asarray(lm.logits([TEXTS[1] + PROMPT]))[0, len(TEXTS[1]) :]
  assert got.shape == (len(PROMPT), CONFIG.vocab_size)
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


_jit_forward = jax.jit(forward)


def test_branches_equal_a_hand_merged_cache(lm, branches):
  """K branches equal a hand-built merged cache read through the plain forward.

  The cache holds every branch's valid rows (positions 0..L_i-1, all visible); the
  prompt follows at positions max_i L_i + j, with the synthesizer's LoRA.
  """
  lengths = [len(t) for t in TEXTS]
  total, t = sum(lengths), len(PROMPT)
  rows = [(i, r) for i, n in enumerate(lengths) for r in range(n)]

  def take(x):  # [K, G, S, H] -> [rows, G, H]: the valid rows, branch after branch
    return jnp.stack([x[i, :, r] for i, r in rows])

  def pad(x):  # room for the prompt, then a batch axis of 1
    return jnp.pad(x, ((0, t),) + ((0, 0),) * (x.ndim - 1))[None]

  def heads_first(x):  # [1, S, G, H] -> the cache's [1, G, S, H]
    return x.transpose(0, 2, 1, 3)

  cache = KVCache(
    k=tuple(heads_first(pad(take(kl))) for kl in branches.cache.k),
    v=tuple(heads_first(pad(take(vl))) for vl in branches.cache.v),
    positions=pad(jnp.asarray([r for _, r in rows], jnp.int32)),
    valid=pad(jnp.ones((total,), bool)),
    index=jnp.asarray(total, jnp.int32),
  )
  lora = random_lora(3)
  positions = (max(lengths) + np.arange(t, dtype=np.int32))[None]
  want, _ = _jit_forward(lm.params, jnp.asarray([PROMPT]), positions, cache, None, lora)
  # A fresh head_affine mapper is the identity (and shares the program of the tests below).
  fresh = Mapper.create("head_affine", CONFIG.num_layers)
  got = logits_of(lm, branches, mapper=fresh, lora=lora)
  np.testing.assert_allclose(got, np.asarray(want[0]), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("kind", ["affine", "head_affine"])
def test_branch_order_does_not_matter(lm, branches, kind):
  mapper, lora = random_mapper(kind), random_lora()
  base = logits_of(lm, branches, mapper=mapper, lora=lora)
  for order in ([2, 0, 1], [1, 2, 0]):
    permuted = logits_of(lm, branches.take(order), mapper=mapper, lora=lora)
    np.testing.assert_allclose(permuted, base, atol=ATOL, rtol=ATOL)


def test_padding_buckets_do_not_matter(lm, branches):
  mapper, lora = random_mapper("head_affine"), random_lora()
  wide = encode_branches(lm, TEXTS, capacity=32)
  assert wide.capacity != branches.capacity
  np.testing.assert_allclose(
    logits_of(lm, wide, mapper=mapper, lora=lora),
    logits_of(lm, branches, mapper=mapper, lora=lora),
    atol=ATOL,
    rtol=ATOL,
  )


def test_zero_init_mapper_and_lora_equal_the_naive_merge(lm, branches):
  naive = logits_of(lm, branches)
  zero_lora = LoRAWeights.init(CONFIG, LORA_CONFIG)
  for kind in ("affine", "head_affine"):
    fresh = Mapper.create(kind, CONFIG.num_layers, seed=1)
    np.testing.assert_allclose(
      logits_of(lm, branches, mapper=fresh, lora=zero_lora), naive, atol=1e-5
    )
    # ... and a trained (non-zero) mapper or LoRA does change them.
    trained = logits_of(lm, branches, mapper=random_mapper(kind), lora=zero_lora)
    assert np.abs(trained - naive).max() > 1e-3
  assert np.abs(logits_of(lm, branches, mapper=fresh, lora=random_lora()) - naive).max() > 1e-3


def test_empty_branches_contribute_nothing(lm):
  with_empty = encode_branches(lm, [TEXTS[0], [], TEXTS[1]])
  without = encode_branches(lm, [TEXTS[0], TEXTS[1]])
  np.testing.assert_allclose(logits_of(lm, with_empty), logits_of(lm, without), atol=ATOL)
  # Only empty branches: the synthesizer sees nothing and its prompt starts at 0.
  nothing = encode_branches(lm, [[]])
  np.testing.assert_allclose(
    logits_of(lm, nothing), np.asarray(lm.logits([PROMPT]))[0], atol=ATOL, rtol=ATOL
  )


@pytest.mark.parametrize("kind", ["affine", "head_affine"])
def test_padding_to_a_fixed_k_and_rows_changes_nothing(lm, branches, kind):
  """Empty padding branches + the real K for the mapper + more rows == the exact shapes."""
  mapper, lora = random_mapper(kind, 3), random_lora(3)
  want = synthesize(lm, branches, PROMPT, mapper=mapper, lora=lora, max_new_tokens=NEW)
  padded = encode_branches(lm, [*TEXTS, [], []])
  got = synthesize(lm, padded, PROMPT, mapper, lora, NEW, num_workers=len(TEXTS), rows=64)
  assert got.tokens == want.tokens
  with pytest.raises(ValueError, match="cannot hold"):
    synthesize(lm, padded, PROMPT, mapper, lora, NEW, rows=16)


def test_synthesize_greedy_is_the_argmax_chain_of_synthesis_logits(lm, branches):
  mapper, lora = random_mapper("head_affine", 2), random_lora(2)
  two = synthesize(lm, branches, PROMPT, mapper=mapper, lora=lora, max_new_tokens=NEW)
  assert len(two.tokens) == NEW and two.prompt_tokens == len(PROMPT)
  assert two.ttft_s is not None and 0 < two.ttft_s <= two.total_s
  # Teacher-forced logits over [prompt + generated]: each token is the argmax after the previous.
  chain = logits_of(lm, branches, PROMPT + two.tokens[:-1], mapper=mapper, lora=lora)
  np.testing.assert_array_equal(chain[len(PROMPT) - 1 :].argmax(-1), two.tokens)
  fused = synthesize(lm, branches, PROMPT, mapper=mapper, lora=lora, max_new_tokens=NEW, fused=True)
  assert fused.tokens == two.tokens and fused.ttft_s is None


def test_one_branch_via_cache_equals_the_same_tokens_via_text(lm):
  """Identity mapper, no LoRA: the cache path and the text path are the same computation."""
  branch = encode_branches(lm, [TEXTS[1]])
  via_cache = synthesize(lm, branch, PROMPT, max_new_tokens=NEW)
  via_text = synthesize_text(lm, TEXTS[1] + PROMPT, max_new_tokens=NEW)
  assert via_text.tokens == lm.generate([TEXTS[1] + PROMPT], NEW)[0]
  assert via_cache.tokens == via_text.tokens
  assert via_text.prompt_tokens == len(TEXTS[1]) + len(PROMPT)
  assert via_text.text is None and via_text.ttft_s is not None


def test_first_token_only_stops_after_the_first_token(lm, branches):
  """The TTFT measurement's early stop: the same first token, nothing decoded after it."""
  mapper, lora = random_mapper("head_affine", 3), random_lora(3)
  full = synthesize(lm, branches, PROMPT, mapper=mapper, lora=lora, max_new_tokens=NEW)
  first = synthesize(
    lm, branches, PROMPT, mapper=mapper, lora=lora, max_new_tokens=NEW, first_token_only=True
  )
  assert first.tokens == full.tokens[:1] and first.ttft_s is not None
  text = synthesize_text(lm, TEXTS[1] + PROMPT, NEW)
  text_first = synthesize_text(lm, TEXTS[1] + PROMPT, NEW, first_token_only=True)
  assert text_first.tokens == text.tokens[:1] and text_first.ttft_s is not None
  with pytest.raises(ValueError, match="fused"):
    synthesize_text(lm, PROMPT, NEW, fused=True, first_token_only=True)


def _other_model_branches(config: ModelConfig, k=2, s=16) -> Branches:
  cache = KVCache.empty(config, k, s)
  cache = cache.replace(valid=jnp.zeros((k, s), bool).at[:, :3].set(True))
  lengths = jnp.full((k,), 3, jnp.int32)
  return Branches(cache, lengths, jnp.zeros((k,), jnp.int32), jnp.zeros((k, s), jnp.int32))


@pytest.mark.parametrize(
  "change",
  [dict(num_layers=3), dict(head_dim=16), dict(num_kv_heads=4), dict(dtype="bfloat16")],
  ids=lambda c: next(iter(c)),
)
def test_branches_from_another_model_are_refused(lm, change):
  br = _other_model_branches(CONFIG.replace(**change))
  with pytest.raises(ValueError, match="does not match the model"):
    synthesis_logits(lm, br, PROMPT)
  with pytest.raises(ValueError, match="does not match the model"):
    synthesize(lm, br, PROMPT, max_new_tokens=NEW)


def test_zero_branches_are_refused(lm, branches):
  none = branches.take(np.zeros((0,), np.int32))
  assert none.num_branches == 0
  with pytest.raises(ValueError, match="at least one branch"):
    synthesis_logits(lm, none, PROMPT)
  with pytest.raises(ValueError, match="at least one branch"):
    synthesize(lm, none, PROMPT, max_new_tokens=NEW)


def test_other_bad_inputs_are_refused(lm, branches):
  with pytest.raises(ValueError, match="capacity"):
    encode_branches(lm, [TEXTS[0], list(range(20))], capacity=16)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    synthesize(lm, branches, PROMPT, max_new_tokens=CONFIG.max_position_embeddings - 10)
  with pytest.raises(ValueError, match="token ids"):
    synthesis_logits(lm, branches, [1, CONFIG.vocab_size])
  with pytest.raises(ValueError, match="token ids"):
    synthesize(lm, branches, [1, -3], max_new_tokens=NEW)
  with pytest.raises(ValueError, match="empty"):
    synthesize(lm, branches, [], max_new_tokens=NEW)
  with pytest.raises(ValueError, match="layers"):
    synthesis_logits(lm, branches, PROMPT, mapper=Mapper.create("affine", CONFIG.num_layers + 1))


def test_empty_synthesizer_prompt_is_a_clear_error(lm, branches):
  """No synthesizer tokens: a ValueError, not a crash in attention."""
  with pytest.raises(ValueError, match="empty"):
    synthesis_logits(lm, branches, [])


def test_branch_lengths_beyond_the_cache_are_refused(lm, branches):
  """Branches whose lengths exceed their cache rows would be merged from clipped rows."""
  bad = branches.replace(lengths=branches.lengths.at[0].set(branches.capacity + 4))
  with pytest.raises(ValueError):
    synthesis_logits(lm, bad, PROMPT)
  with pytest.raises(ValueError):
    synthesize(lm, bad, PROMPT, max_new_tokens=NEW)


@pytest.mark.parametrize("kind", ["affine", "head_affine"])
def test_a_batch_of_problems_synthesizes_as_each_one_alone(lm, branches, kind):
  # Different K, branch lengths, capacities and prompts per problem; one program.
  mapper, lora = random_mapper(kind, 4), random_lora(4)
  problems = [
    (branches, PROMPT),
    (encode_branches(lm, [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]]), [11, 12, 13]),
    (encode_branches(lm, [[7] * 20, [8] * 3, [9] * 11, [10]]), [20, 21, 22, 23, 24, 25]),
  ]
  got = synthesize_batch(lm, [b for b, _ in problems], [p for _, p in problems], mapper, lora, NEW)
  for (b, prompt), result in zip(problems, got, strict=True):
    want = synthesize(lm, b, prompt, mapper, lora, NEW)
    assert result.tokens == want.tokens and result.ttft_s is None
  with pytest.raises(ValueError, match="one prompt per problem"):
    synthesize_batch(lm, [branches], [PROMPT, PROMPT])
