"""The binding probe (`psynth_jax/eval/probe.py`): its pieces on known inputs.

* value slots: each number token right after an item token, with the item's row;
* the ridge probe reads a planted linear label perfectly and random labels at chance;
* keys are probed before RoPE: the same text at shifted positions gives the same rows;
* `collect` gives one row per value token, labelled by its item.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from psynth_jax.eval import probe
from psynth_jax.kv_cache import KVCache
from psynth_jax.model.transformer import hidden_states
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_pretrain import language_model
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.testing import random_params, tiny_config


def test_value_slots_pair_each_value_with_its_item():
  tok = SuiteTokenizer()
  texts = [tok.decode([i]) for i in tok.encode(" price: apple 4, fig 7")]
  assert probe.value_slots(texts, ["apple", "fig"]) == [(3, 2, "apple"), (6, 5, "fig")]
  assert probe.value_slots(texts, ["fig"]) == [(6, 5, "fig")]


def test_ridge_probe_reads_a_planted_label_and_not_noise():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, 600)
  x = rng.normal(size=(600, 16))
  x[:, :4] += 3.0 * np.eye(4)[y]  # the label, linearly readable
  groups = np.arange(600) // 3
  assert probe.ridge_probe(x, y, groups)["accuracy"] > 0.95
  shuffled = rng.permutation(y)
  assert probe.ridge_probe(x, shuffled, groups)["accuracy"] < 0.4  # chance is 0.25
  with pytest.raises(ValueError, match="5 examples"):
    probe.ridge_probe(x[:6], y[:6], np.arange(6) // 3)


@pytest.fixture(scope="module")
def lm():
  config = tiny_config(vocab_size=SuiteTokenizer().vocab_size)
  return language_model(random_params(config))


def test_keys_are_probed_without_their_rotation(lm):
  ids = jnp.asarray([SuiteTokenizer().encode(" price: apple 4, fig 7")])
  n = ids.shape[1]
  rows = []
  for shift in (0, 9):
    positions = shift + jnp.arange(n)[None]
    _, cache = hidden_states(lm.params, ids, positions, KVCache.empty(lm.config, 1, n))
    k = np.asarray(cache.k[1][0]).transpose(1, 0, 2)  # [S, G, H]
    rows.append(probe._unrotated(k, np.asarray(positions[0]), lm.config, 1))
  np.testing.assert_allclose(rows[0], rows[1], atol=1e-4)


@pytest.mark.parametrize("encoding", ["standalone", "worker"])
def test_collect_gives_one_labelled_row_per_value(lm, encoding):
  examples = synthetic.generate("test", 3, 1, families=["tools"])
  items = [x for _, _, pool in synthetic._TOOLS.values() for x in pool]
  rows = probe.collect(lm, examples, items, encoding)
  want = [
    items.index(x)
    for ex in examples
    for b in ex.branches
    for x in synthetic._tool_results(b).popitem()[1]
  ]
  assert rows.labels.tolist() == want and len(rows.keys) == lm.config.num_layers
  width = lm.config.num_kv_heads * lm.config.head_dim
  assert rows.keys[0].shape == rows.values[0].shape == (len(want), width)
  with pytest.raises(ValueError, match="encoding"):
    probe.collect(lm, examples, items, "pasted")
