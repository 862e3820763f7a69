"""Tests for psynth_jax.sharding: rules, placement, sharded == one-device steps, multi-process."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from psynth_jax import sharding
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import abstract_params, init_params, params_from_flat
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.train import batching
from psynth_jax.train import step as step_lib
from psynth_jax.train.data import gold_trace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = SuiteTokenizer()
# One layer: these tests are about placement, and compile time grows with depth.
# The vocabulary padded to a multiple of 8, so that every mesh axis divides it.
VOCAB = -(-TOK.vocab_size // 8) * 8
CONFIG = ModelConfig("llama", VOCAB, 64, 128, 1, 4, 2, 16, max_position_embeddings=1024)
SPEC = batching.BatchSpec(4, 64, 160, 112, 16)
FAST = {"xla_backend_optimization_level": 0}


def test_resolve_shape():
  assert sharding.resolve_shape((1, -1, 2), 8) == (1, 4, 2)
  assert sharding.resolve_shape((2, 2, 2), 8) == (2, 2, 2)
  for bad in ((3, -1, 1), (-1, -1, 1), (2, 2, 1), (0, 8, 1)):
    with pytest.raises(ValueError):
      sharding.resolve_shape(bad, 8)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    sharding.MeshConfig(rules=(("embed", "model"),))


def test_logical_rules_map_axes_once_and_replicate_what_does_not_divide():
  rules = sharding.DEFAULT_RULES
  spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), rules)
  assert spec == P("fsdp", "tensor", None)
  assert sharding.logical_to_spec(("batch", None), rules) == P(("data", "fsdp"), None)
  # A mesh axis is used once per array: the second "embed" stays replicated.
  assert sharding.logical_to_spec(("embed", "embed"), rules) == P("fsdp", None)
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 2, 4)))
  # 2 kv heads do not split 4 ways; 4 query heads do; size-1 mesh axes are dropped.
  assert sharding.logical_to_spec(("embed", "kv_heads"), rules, (64, 2), mesh) == P("fsdp", None)
  assert sharding.logical_to_spec(("embed", "heads"), rules, (64, 4), mesh) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch",), rules, (8,), mesh) == P("fsdp")


def test_params_are_created_in_their_shards():
  mesh = sharding.make_mesh(sharding.MeshConfig((2, 2, 2)))
  rules = sharding.DEFAULT_RULES
  params = sharding.shard_init(lambda: init_params(CONFIG, 0), mesh, rules, FAST)
  attn = params.state["layers"][0]["attn"]
  q = attn["q"][...]
  assert q.sharding.spec == P("tensor", None, "fsdp")  # [N, H, D]
  assert attn["o"][...].sharding.spec == P("fsdp", "tensor", None)  # [D, N, H]
  assert params.state["embed"]["embedding"][...].sharding.spec == P("tensor", "fsdp")
  shard = q.addressable_shards[0]
  assert shard.data.shape == (2, 16, 32)  # [N / tensor, H, D / fsdp]
  np.testing.assert_array_equal(shard.data, np.asarray(q)[shard.index])
  lora = sharding.shard_init(lambda: LoRAWeights.init(CONFIG), mesh, rules, FAST)
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(lora))


def _numpy_params(seed=0):
  """Random base weights drawn with numpy (compiling jax's initialisers costs more than a step)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, var in nnx.to_flat_state(abstract_params(CONFIG).state):
    name, shape = ".".join(str(p) for p in path), var.get_value().shape
    flat[name] = np.ones(shape) if name.endswith("scale") else rng.normal(size=shape) * 0.1
  return jax.tree.map(np.asarray, params_from_flat(CONFIG, flat))


@pytest.fixture(scope="module")
def setup():
  examples = synthetic.generate("train", 4, 0, max_workers=SPEC.max_branches)
  records = [gold_trace(synthetic.TASK, e.problem()) for e in examples]
  batcher = batching.Batcher(TOK, SPEC, TOK.pad_token_id, TOK.eos_token_id)
  host, reasons = batcher(records)
  assert not reasons
  # A large eps makes each update smooth in its gradient: with 1e-8, Adam's first steps
  # are ~lr * sign(grad), and a gradient element near zero flips with the summation order.
  opt_config = step_lib.OptimizerConfig(learning_rate=1e-2, eps=1e-3)
  config = step_lib.StepConfig(branch_rows=SPEC.branch_rows)
  mapper = Mapper.create("affine", CONFIG.num_layers)
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=4))
  state = step_lib.init_state(mapper, lora, step_lib.make_optimizer(opt_config, "both"))
  # numpy copies: every mesh gets fresh buffers (the step donates its state).
  return host, opt_config, config, _numpy_params(), jax.tree.map(np.asarray, state)


def _run_two_steps(mesh_shape, setup):
  host, opt_config, config, base, state = setup
  mesh = sharding.make_mesh(sharding.MeshConfig(mesh_shape))
  rules = sharding.DEFAULT_RULES
  base, state = sharding.shard_tree(base, mesh, rules), sharding.shard_tree(state, mesh, rules)
  batch = sharding.host_local_to_global(host, mesh, rules)
  step_fn = step_lib.make_train_step(config, opt_config, mesh, rules, state, base, batch, FAST)
  losses = []
  for _ in range(2):
    state, metrics = step_fn(state, base, batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state.params)


def test_sharded_step_matches_one_device(setup):
  want_losses, want = _run_two_steps((1, 1, 1), setup)
  assert want_losses[1] < want_losses[0]
  for shape in ((2, 2, 2), (1, 2, 4)):
    losses, params = _run_two_steps(shape, setup)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    # At a small fraction of lr.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), params, want)


WORKER = textwrap.dedent(
  """
  import importlib.util, json, os, sys
  import numpy as np
  import jax
  from psynth_jax.train import trainer

  spec = importlib.util.spec_from_file_location("synthetic_config", {config!r})
  synthetic_config = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(synthetic_config)

  def run(workdir, process_id=0, num_processes=0, port=0, mesh_shape=(1, -1, 1)):
    config = synthetic_config.get_config("random,fast")
    config.data.num_examples = 16
    config.batch.update(batch_size=8, max_branches=4, branch_rows=160, synth_tokens=112,
                        target_tokens=16)
    config.data.task_options.max_workers = 4
    config.model.init.num_layers = 1
    config.train.num_steps = 2
    config.log_every = 1
    config.optimizer.learning_rate = 1e-2
    config.export.enabled = False
    config.mesh.shape = mesh_shape
    if num_processes:
      config.distributed.update(coordinator_address=f"localhost:{{port}}",
                                num_processes=num_processes, process_id=process_id)
    result = trainer.train(config, workdir)
    params = trainer.fetch(result.state.params)
    flat = {{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}}
    losses = [row["loss"] for row in result.history]
    return flat, losses, jax.process_count(), jax.device_count()

  if __name__ == "__main__":
    workdir, process_id, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    flat, losses, processes, devices = run(workdir, process_id, 2, port)
    np.savez(out, **flat)
    with open(out + ".json", "w") as f:
      json.dump({{"losses": losses, "processes": processes, "devices": devices}}, f)
  """
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_take_the_same_steps_as_one(tmp_path):
  """Two jax.distributed CPU processes x 4 devices == one process (gloo collectives)."""
  script = tmp_path / "worker.py"
  script.write_text(
    WORKER.format(config=os.path.join(REPO, "psynth_jax", "configs", "synthetic.py"))
  )
  port, workdir = _free_port(), tmp_path / "two"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  env["JAX_PLATFORMS"] = "cpu"
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(workdir), str(i), str(port), str(tmp_path / f"p{i}.npz")],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  if any(p.returncode for p in procs):
    if "gloo" in outputs[0].lower() and "not" in outputs[0].lower():
      pytest.skip("this jaxlib has no CPU collectives for jax.distributed")
    raise AssertionError("distributed run failed:\n" + "\n".join(o[-3000:] for o in outputs))

  sys.path.insert(0, str(tmp_path))
  try:
    import worker
  finally:
    sys.path.remove(str(tmp_path))
  # The reference: one process, one device (cheaper to compile than 8 devices).
  want, want_losses, processes, _ = worker.run(str(tmp_path / "one"), mesh_shape=(1, 1, 1))
  assert processes == 1
  for i in range(2):
    meta = json.loads((tmp_path / f"p{i}.npz.json").read_text())
    assert meta["processes"] == 2 and meta["devices"] == 8
    np.testing.assert_allclose(meta["losses"], want_losses, rtol=1e-5)
    got = np.load(tmp_path / f"p{i}.npz")
    for name, value in want.items():
      np.testing.assert_allclose(got[name], value, atol=1e-4)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]  # one checkpoint, written jointly


def test_variable_shardings_keep_metadata():
  mesh = sharding.make_mesh(sharding.MeshConfig((1, 8, 1)))
  abstract = jax.eval_shape(lambda: init_params(CONFIG, 0))
  shardings = sharding.tree_shardings(abstract, mesh, sharding.DEFAULT_RULES)
  variables = jax.tree.leaves(shardings.state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert all(v.get_metadata()["axes"] for v in variables)
  x = jax.device_put(jnp.zeros((8, 3)), sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 2))
  assert x.sharding.spec == P(("data", "fsdp"), None)
