"""experiments/profile_ops.py: every product of a decode step lands in its group."""

import importlib.util
import os
import sys

import pytest

from psynth_jax.testing import random_params, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def profile_ops():
  sys.path.insert(0, os.path.join(REPO, "experiments"))  # it imports bench_cache_path
  spec = importlib.util.spec_from_file_location(
    "profile_ops", os.path.join(REPO, "experiments/profile_ops.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize(("batch", "capacity"), [(1, 40), (3, 300)])
def test_decode_profile_finds_the_unembedding_projections_and_attention(
  profile_ops, batch, capacity
):
  # A vocabulary no other axis shares, so the unembedding is told apart by its width.
  config = tiny_config(vocab_size=97, num_layers=3)
  params = random_params(config)
  # 300 rows: attention runs in the cache-prefix switch (a conditional), 40: inline.
  row = profile_ops.profile_decode(params, batch, capacity, filled=5, steps=2)
  groups = row["groups"]
  assert groups["unembed"]["ops"] == 1
  assert groups["unembed"]["top"][0]["shape"] == f"f32[{batch},97]"
  # q, k, v, o, gate, up, down in every layer; XLA may merge two products of one input.
  assert 5 * config.num_layers <= groups["projections"]["ops"] <= 7 * config.num_layers
  assert groups["attention"]["ops"] >= 2 * config.num_layers  # scores and values
  assert all(g in profile_ops.GROUPS for g in groups)
  assert row["thunk_ms_per_run"] > 0
  leaves = sum(g["ms"] for g in groups.values())
  assert leaves >= row["thunk_ms_per_run"] * 0.999  # the remainder went to "other"
