"""Sharded loading and inference: straight from the file into the shards, and sharded ==
unsharded for logits, generation, worker branches and synthesis (8 emulated CPU devices)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from psynth_jax import sharding
from psynth_jax.language_model import load_pretrained
from psynth_jax.mapper import Mapper
from psynth_jax.model.checkpoint import save_converted
from psynth_jax.model.lora import LoRAWeights
from psynth_jax.model.transformer import flat_state
from psynth_jax.synthesis import synthesis_logits, synthesize, synthesize_text
from psynth_jax.testing import random_params, tiny_config
from psynth_jax.workers import run_workers

# 8 query / 8 kv heads, D and F even, V a multiple of 8: every tensor-parallel
# axis divides 2, 4 and 8 ways, so nothing silently stays replicated.
CONFIG = tiny_config(
  model_type="qwen3",
  qk_norm=True,
  vocab_size=128,
  hidden_size=64,
  intermediate_size=96,
  num_heads=8,
  num_kv_heads=8,
  max_position_embeddings=256,
)
MESHES = [(1, 2, 4), (1, 1, 8)]
PROMPTS = [[5, 9, 17, 3], [7, 7, 2, 40, 41, 90], [11]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("model")
  save_converted(random_params(CONFIG, seed=3), path)
  return path


@pytest.fixture(scope="module")
def one_device(folder):
  return load_pretrained(folder)


def _sharded(folder, shape):
  mesh = sharding.make_mesh(sharding.MeshConfig(shape))
  return load_pretrained(folder, mesh=mesh), mesh


def _spread(x) -> bool:
  """True if no device holds the whole array."""
  return x.sharding.shard_shape(x.shape) != x.shape


@pytest.mark.parametrize("shape", MESHES)
def test_load_places_every_large_tensor_in_shards(folder, one_device, shape):
  lm, mesh = _sharded(folder, shape)
  want, got = flat_state(one_device.params), flat_state(lm.params)
  assert lm.params.fingerprint == one_device.params.fingerprint
  for name, x in got.items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[name]), err_msg=name)
    assert x.sharding.mesh == mesh
    if x.ndim >= 2:  # projections, embedding, head: spread; norm scales are replicated
      assert _spread(x), f"{name} {x.shape} is whole on a device: {x.sharding.spec}"


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_inference_equals_one_device(one_device, folder, shape):
  lm, _ = _sharded(folder, shape)
  lora = LoRAWeights.init(CONFIG, seed=1)
  lora = jax.tree.map(lambda x: x + 0.05, lora)  # nonzero B: the adapter matters
  tokens = np.asarray([PROMPTS[1]])
  ref, got = one_device.logits(tokens, lora), lm.logits(tokens, lora)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)

  assert lm.generate(PROMPTS, 12) == one_device.generate(PROMPTS, 12)

  ref_workers, got_workers = run_workers(one_device, PROMPTS, 10), run_workers(lm, PROMPTS, 10)
  assert got_workers.tokens == ref_workers.tokens
  for a, b in zip(got_workers.branches.cache.k, ref_workers.branches.cache.k, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  cache = got_workers.branches.cache
  for x in (*cache.k, *cache.v):  # [K, G, S, H]: every layer's kv heads over the tensor axis
    assert tuple(x.sharding.spec)[:2] == (None, "tensor"), x.sharding.spec

  mapper = Mapper.create("affine", CONFIG.num_layers, seed=2)
  prompt = [3, 4, 5]
  ref_logits = synthesis_logits(one_device, ref_workers.branches, prompt, mapper, lora)
  got_logits = synthesis_logits(lm, got_workers.branches, prompt, mapper, lora)
  np.testing.assert_allclose(np.asarray(got_logits), np.asarray(ref_logits), atol=1e-5, rtol=0)
  ref = synthesize(one_device, ref_workers.branches, prompt, mapper, lora, 8)
  got = synthesize(lm, got_workers.branches, prompt, mapper, lora, 8)
  assert got.tokens == ref.tokens
  assert (
    synthesize_text(lm, PROMPTS[1], 8).tokens == synthesize_text(one_device, PROMPTS[1], 8).tokens
  )


def test_load_reads_one_tensor_at_a_time(tmp_path):
  """Peak host memory of a sharded load: the model's own device buffers (CPU devices
  live in host memory) plus about one tensor, never a second copy of the model."""
  config = CONFIG.replace(hidden_size=512, intermediate_size=1024, vocab_size=8192, num_layers=4)
  params = random_params(config)
  save_converted(params, tmp_path / "m")
  sizes = [np.asarray(x).nbytes for x in flat_state(params).values()]
  total, largest = sum(sizes), max(sizes)
  assert total > 50e6
  script = textwrap.dedent(
    f"""
    import json
    import jax
    from psynth_jax import sharding
    from psynth_jax.language_model import load_pretrained
    jax.numpy.zeros(1).block_until_ready()
    def status(key):  # per address space (ru_maxrss would carry the parent's over exec)
      line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
      return int(line.split()[1]) * 1024
    before = status("VmRSS")
    mesh = sharding.make_mesh(sharding.MeshConfig((1, 2, 4)))
    lm = load_pretrained({str(tmp_path / "m")!r}, mesh=mesh)
    jax.block_until_ready(lm.params)
    peak = status("VmHWM")
    print(json.dumps({{"before": before, "peak": peak}}))
    """
  )
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  out = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rss = json.loads(out.stdout.strip().splitlines()[-1])
  growth = rss["peak"] - rss["before"]
  # The sharded buffers total `total` bytes; reading all tensors first would add another
  # `total`. Allow the buffers, two tensors in flight and a little allocator slack.
  assert growth < total + 2 * largest + 16e6, (growth / 1e6, total / 1e6, largest / 1e6)
