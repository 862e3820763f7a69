"""Inputs made for another model are refused by name at every public entry point.

* A LoRA or a mapper whose shapes belong to another model (deeper, shallower,
  wider): `LanguageModel.logits` / `generate`, `synthesize`, `synthesis_logits`.
* Branches made by another model of the same shapes (other weights, another
  RoPE base): refused unless `allow_foreign_branches=True`, via fingerprints.
* A fingerprint is a function of the config and the weights: equal for the same
  weights however they were built, different for other weights or RoPE.
* `num_workers` outside [non-empty branches, branches] is refused.
"""

import jax
import numpy as np
import pytest

from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import flat_state, init_params, params_from_flat
from psynth_jax.synthesis import synthesis_logits, synthesize
from psynth_jax.testing import tiny_config
from psynth_jax.workers import encode_branches, run_workers

CONFIG = tiny_config()
TEXTS = [[4, 8, 15, 16, 23], [42, 1, 2, 3, 5], [9, 60, 11]]
PROMPT = [30, 31, 2, 17]
LORA = LoRAConfig(rank=2, alpha=4.0)


@pytest.fixture(scope="module")
def lm():
  return LanguageModel(init_params(CONFIG, seed=0))


@pytest.fixture(scope="module")
def branches(lm):
  return encode_branches(lm, TEXTS)


def _entry_points(lm, branches, lora=None, mapper=None):
  """Every public call that takes a LoRA (and, for synthesis, a mapper)."""
  calls = {
    "synthesize": lambda: synthesize(lm, branches, PROMPT, mapper, lora, max_new_tokens=2),
    "synthesis_logits": lambda: synthesis_logits(lm, branches, PROMPT, mapper, lora),
  }
  if mapper is None:
    calls["logits"] = lambda: lm.logits([[1, 2, 3]], lora=lora)
    calls["generate"] = lambda: lm.generate([[1, 2, 3]], 2, lora=lora)
  return calls


@pytest.mark.parametrize(
  "other",
  [
    CONFIG.replace(num_layers=3),  # deeper: was silently truncated
    CONFIG.replace(num_layers=1),  # shallower: was an IndexError
    CONFIG.replace(hidden_size=48),  # wider: was a TypeError deep in JAX
    CONFIG.replace(num_kv_heads=1),  # other k/v width
  ],
  ids=["deeper", "shallower", "wider", "fewer_kv_heads"],
)
def test_lora_of_another_model_is_refused(lm, branches, other):
  lora = LoRAWeights.init(other, LORA)
  for name, call in _entry_points(lm, branches, lora=lora).items():
    with pytest.raises(ValueError, match="LoRA adapter does not fit this model") as err:
      call()
    assert "needs" in str(err.value), name


def test_lora_of_this_model_is_accepted(lm, branches):
  lora = LoRAWeights.init(CONFIG, LORA)
  for call in _entry_points(lm, branches, lora=lora).values():
    call()


@pytest.mark.parametrize("layers", [1, 3])
def test_mapper_of_another_depth_is_refused(lm, branches, layers):
  for kind in ("affine", "head_affine", "identity"):
    mapper = Mapper.create(kind, layers)
    for call in _entry_points(lm, branches, mapper=mapper).values():
      with pytest.raises(ValueError, match=f"made for {layers} layers, the model has 2"):
        call()


def test_fingerprint_is_a_function_of_config_and_weights(lm):
  again = params_from_flat(CONFIG, {k: np.asarray(v) for k, v in flat_state(lm.params).items()})
  assert again.fingerprint == lm.params.fingerprint != ""
  assert init_params(CONFIG, seed=1).fingerprint != lm.params.fingerprint
  other_rope = params_from_flat(
    CONFIG.replace(rope_theta=5e5), {k: np.asarray(v) for k, v in flat_state(lm.params).items()}
  )
  assert other_rope.fingerprint.split(":")[1] == lm.params.fingerprint.split(":")[1]
  assert other_rope.fingerprint != lm.params.fingerprint
  # Static: it survives tree maps and jit, and costs no recompilation per call.
  assert jax.tree.map(lambda x: x, lm.params).fingerprint == lm.params.fingerprint
  assert jax.jit(lambda p: p)(lm.params).fingerprint == lm.params.fingerprint


def test_branches_carry_their_model_fingerprint(lm, branches):
  assert branches.fingerprint == lm.params.fingerprint
  workers = run_workers(lm, [[1, 2, 3], [4, 5]], max_new_tokens=3)
  assert workers.branches.fingerprint == lm.params.fingerprint
  assert workers.branches.take([1, 0]).fingerprint == lm.params.fingerprint


@pytest.mark.parametrize(
  "config, seed",
  [(CONFIG, 7), (CONFIG.replace(rope_theta=5e5), 0)],  # other weights; same weights, other RoPE
  ids=["other_weights", "other_rope"],
)
def test_branches_of_another_model_are_refused(lm, branches, config, seed):
  foreign_lm = LanguageModel(init_params(config, seed=seed))
  foreign = encode_branches(foreign_lm, TEXTS)
  for call in (
    lambda **kw: synthesize(lm, foreign, PROMPT, max_new_tokens=2, **kw),
    lambda **kw: synthesis_logits(lm, foreign, PROMPT, **kw),
  ):
    with pytest.raises(ValueError, match="made by another model") as err:
      call()
    assert foreign.fingerprint in str(err.value) and lm.params.fingerprint in str(err.value)
    call(allow_foreign_branches=True)  # the explicit override


@pytest.mark.parametrize("num_workers", [-1, 0, 2, 4])
def test_num_workers_outside_the_branches_is_refused(lm, branches, num_workers):
  with pytest.raises(ValueError, match=f"num_workers={num_workers} must be between"):
    synthesize(lm, branches, PROMPT, max_new_tokens=2, num_workers=num_workers)


def test_num_workers_may_count_empty_branches(lm):
  padded = encode_branches(lm, TEXTS + [[]])
  synthesize(lm, padded, PROMPT, max_new_tokens=2, num_workers=3)
  synthesize(lm, padded, PROMPT, max_new_tokens=2, num_workers=4)
