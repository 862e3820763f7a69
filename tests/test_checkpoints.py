"""Tests for psynth_jax.train.checkpoints and resuming the trainer: exact resume, damaged steps."""

import glob
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from psynth_jax.configs import synthetic as synthetic_config
from psynth_jax.convert.peft import load_peft_lora
from psynth_jax.convert.reference import mapper_from_state_dict
from psynth_jax.mapper import Mapper, cache_statistics
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.train import batching, checkpoints, data, trainer
from psynth_jax.train import step as step_lib

CONFIG = ModelConfig("llama", 56, 32, 64, 1, 2, 1, 16)


@pytest.fixture(scope="module")
def state():
  optimizer = step_lib.make_optimizer(step_lib.OptimizerConfig(), "both")
  mapper = Mapper.create("affine", CONFIG.num_layers)
  return step_lib.init_state(mapper, LoRAWeights.init(CONFIG, LoRAConfig(rank=2)), optimizer)


def _with_step(state, step):
  return state.replace(step=np.asarray(step, np.int32))


def _damage(directory, step, how):
  """Truncates (or flips bytes in) every array data file of a saved step."""
  files = glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "rb") as f:
      content = bytearray(f.read())
    if how == "truncate":
      content = content[: len(content) // 2]
    else:
      for i in range(len(content) // 3, len(content) // 3 + 16):
        content[i] ^= 0x5A
    with open(path, "wb") as f:
      f.write(bytes(content))


def _assert_trees_equal(a, b):
  jax.tree.map(
    np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b)
  )


def test_round_trip_keeps_the_last_n_steps(tmp_path, state):
  ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _with_step(state, step), {"iterator": {"epoch": 0, "index": step}})
  assert ckpt.all_steps() == [2, 3]
  restored, position = ckpt.restore(2, state)
  _assert_trees_equal(restored, _with_step(state, 2))
  assert position == {"iterator": {"epoch": 0, "index": 2}}
  assert isinstance(restored.params["lora"], LoRAWeights)
  assert restored.params["mapper"].state["fc2"]["kernel"][...].sharding == (
    state.params["mapper"].state["fc2"]["kernel"][...].sharding
  )
  ckpt.close()
  # The frozen base is not in it: only mapper, LoRA, optimizer state and counters.
  names = checkpoints.flatten(state)[0]
  assert all(n.split(".")[0] in ("step", "params", "opt_state", "skipped") for n in names)


def test_structure_mismatch_names_the_keys(tmp_path, state):
  ckpt = checkpoints.Checkpointer(tmp_path / "ckpt")
  ckpt.save(1, state)
  other = state.replace(params={**state.params, "mapper": Mapper.create("identity", 1)})
  with pytest.raises(checkpoints.CheckpointError, match="another state structure: missing=.*fc1"):
    ckpt.restore(1, other)


def test_a_state_of_other_shapes_is_refused_and_nothing_is_set_aside(tmp_path, state):
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoints.Checkpointer(directory)
  ckpt.save(1, state)
  # Same names, other shapes: e.g. a run resumed with a narrower mapper.
  narrower = Mapper.create("affine", CONFIG.num_layers, features="length")
  other = state.replace(params={**state.params, "mapper": narrower})
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"fc1.kernel.*\(3, 32\)"):
    ckpt.restore(1, other)
  with pytest.raises(checkpoints.CheckpointMismatchError):
    ckpt.restore_latest(other)
  assert ckpt.all_steps() == [1] and not os.path.exists(directory + "_corrupt")
  restored, _ = ckpt.restore(1, state)  # still there, intact
  _assert_trees_equal(restored, state)


# orbax's reader threads report the failed read once more, from a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_a_damaged_step_gives_a_clear_error_and_the_previous_one_is_used(tmp_path, state, how):
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoints.Checkpointer(directory)
  for step in (1, 2):
    ckpt.save(step, _with_step(state, step), {"iterator": {"epoch": 0, "index": step}})
  ckpt.close()
  _damage(directory, 2, how)
  ckpt = checkpoints.Checkpointer(directory)
  with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint step 2 in {directory}"):
    ckpt.restore(2, state)
  step, restored, position = ckpt.restore_latest(state)
  assert step == 1 and position["iterator"]["index"] == 1
  _assert_trees_equal(restored, _with_step(state, 1))
  assert "falling back" in ckpt.fallbacks[0] and "step 2" in ckpt.fallbacks[0]
  assert ckpt.all_steps() == [1] and os.listdir(directory + "_corrupt")[0].startswith("2-")
  ckpt.save(2, _with_step(state, 2))  # the bad step is out of the way
  assert ckpt.all_steps() == [1, 2]


def test_tampered_arrays_fail_the_digest(tmp_path, state):
  directory = str(tmp_path / "ckpt")
  ckpt = checkpoints.Checkpointer(directory)
  ckpt.save(1, state)
  ckpt.close()
  meta_path = os.path.join(directory, "1", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  meta["digest"] = "0" * 64  # as if the arrays had been rewritten behind the metadata's back
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(checkpoints.CheckpointError, match="corrupt"):
    checkpoints.Checkpointer(directory).restore(1, state)
  with pytest.raises(checkpoints.CheckpointError, match="no checkpoint can be restored"):
    checkpoints.Checkpointer(directory).restore_latest(state)


def test_an_interrupted_save_is_invisible(tmp_path, state):
  directory = tmp_path / "ckpt"
  ckpt = checkpoints.Checkpointer(directory)
  ckpt.save(1, state)
  ckpt.close()
  # What a kill during the save of step 2 leaves: orbax's temporary directory.
  partial = directory / "2.orbax-checkpoint-tmp-1234"
  os.makedirs(partial / "state")
  (partial / "state" / "junk").write_bytes(b"\0" * 10)
  ckpt = checkpoints.Checkpointer(directory)
  assert ckpt.all_steps() == [1] and ckpt.restore_latest(state)[0] == 1
  assert not partial.exists()  # cleaned up on start


# ---------------------------------------------------------------- resuming the trainer
def _config(num_steps=6):
  config = synthetic_config.get_config("random,fast")
  config.model.init.update(num_layers=1, hidden_size=32, intermediate_size=64)
  config.data.num_examples = 24
  config.data.task_options.max_workers = 5
  # Budgets that some examples exceed (K = 5, long answers): they are skipped.
  config.batch.update(
    batch_size=4, max_branches=4, branch_rows=160, synth_tokens=112, target_tokens=6
  )
  config.lora.rank = 4
  config.train.num_steps = num_steps
  config.optimizer.learning_rate = 1e-2
  config.mesh.shape = (1, 1, 1)
  config.checkpoint.every = 2
  config.log_every = 1
  return config


def _params(result):
  return jax.tree.map(np.asarray, trainer.fetch(result.state.params))


def _logged_steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  return workdir, trainer.train(_config(), workdir)


def test_a_second_train_in_the_process_compiles_nothing(uninterrupted, tmp_path):
  # jax's own cache (static configs, module-level functions) must serve a second
  # run with the same config: no hand-made memo of jitted wrappers.
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.jit(lambda x: x * 3 + 1)(np.ones(5))  # the listener does see a new program
    assert len(compiles) == 1
    compiles.clear()
    result = trainer.train(_config(), str(tmp_path))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert result.step == 6 and compiles == []


def test_uninterrupted_run_skips_and_counts_oversize_examples(uninterrupted):
  workdir, result = uninterrupted
  config = _config()
  source = data.load_split(os.path.join(workdir, "tfds"), "train")
  it = data.BatchIterator(source, seed=0, batch_size=4, process_index=0, process_count=1)
  tok = SuiteTokenizer()
  spec = trainer.batch_spec(config)
  batcher = batching.Batcher(tok, spec, tok.pad_token_id, tok.eos_token_id)
  reasons = [batcher.encode(e)[1] for _ in range(6) for e in next(it)]
  want = {r: reasons.count(r) for r in set(reasons) - {None}}
  assert want and result.skip_reasons == want
  assert int(trainer.fetch(result.state.skipped)) == sum(want.values())
  assert result.history[-1]["skipped_total"] == sum(want.values())
  assert _logged_steps(workdir) == [1, 2, 3, 4, 5, 6]
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))


def test_export_round_trips_through_peft_and_the_reference_mapper(uninterrupted):
  workdir, result = uninterrupted
  params = _params(result)
  lora = load_peft_lora(os.path.join(workdir, "export", "lora"))  # shapes from the tensors
  assert lora.config == params["lora"].config
  jax.tree.map(
    np.testing.assert_array_equal, jax.tree.map(np.asarray, lora.state), params["lora"].state
  )
  state_dict = safetensors.numpy.load_file(
    os.path.join(workdir, "export", "mapper", "mapper.safetensors")
  )
  mapper = mapper_from_state_dict(state_dict, params["mapper"].num_layers)
  jax.tree.map(
    np.testing.assert_array_equal, jax.tree.map(np.asarray, mapper.state), params["mapper"].state
  )


def test_a_text_arm_run_exports_its_lora_marked_for_the_text_synthesizer(tmp_path):
  """train.path="text" end to end: the batches carry the teacher text, the LoRA learns,
  and the export says which synthesizer it belongs to."""
  config = _config(num_steps=2)
  config.train.path, config.train.trainable = "text", "lora_only"
  result = trainer.train(config, str(tmp_path))
  assert result.step == 2 and all(np.isfinite(row["loss"]) for row in result.history)
  with open(tmp_path / "export" / "mapper" / "mapper_config.json") as f:
    assert json.load(f)["path"] == "text"
  lora = load_peft_lora(os.path.join(tmp_path, "export", "lora"))
  trained = _params(result)["lora"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, lora.state), trained.state)
  assert any(np.abs(np.asarray(b)).max() > 0 for _, b in map(trained.arrays, ("q", "v")))


def _randomise(tree, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), tree)


@pytest.mark.parametrize("kind", ["affine", "head_affine"])
@pytest.mark.parametrize("features", ["both", "length", "num_workers", "none"])
def test_load_export_reads_back_what_export_wrote(tmp_path, kind, features):
  mapper = Mapper.create(kind, CONFIG.num_layers, features, hidden_dim=8)
  mapper = mapper.replace(state=_randomise(mapper.state))
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=2))
  lora = lora.replace(state=_randomise(lora.state, 1))
  folder = checkpoints.export({"mapper": mapper, "lora": lora}, str(tmp_path / "export"))
  # The reference's layout: only the features the mode reads (+ 2 statistics for head_affine).
  saved = safetensors.numpy.load_file(os.path.join(folder, "mapper", "mapper.safetensors"))
  assert saved["net.0.weight"].shape == (8, mapper.num_features + (kind == "head_affine") * 2)
  got_mapper, got_lora = checkpoints.load_export(folder, CONFIG)
  assert (got_mapper.kind, got_mapper.features, got_mapper.hidden_dim) == (kind, features, 8)
  assert got_mapper.num_layers == CONFIG.num_layers
  _assert_trees_equal(got_mapper.state, mapper.state)
  _assert_trees_equal(got_lora.state, lora.state)
  with pytest.raises(ValueError, match="layers"):
    checkpoints.load_export(folder, CONFIG.replace(num_layers=3))
  with pytest.raises(FileNotFoundError, match="not an export folder"):
    checkpoints.load_export(str(tmp_path), CONFIG)


@pytest.mark.parametrize("kind", ["affine", "head_affine"])
@pytest.mark.parametrize("features", ["length", "num_workers", "none"])
def test_load_export_reads_old_zero_fed_exports_exactly(tmp_path, kind, features):
  """Older exports kept 3 features in every mode (dropped ones fed zeros) and no hidden_dim."""
  stats = 2 if kind == "head_affine" else 0
  rng = np.random.default_rng(2)
  old = {
    "net.0.weight": rng.normal(0, 0.8, (32, 3 + stats)).astype(np.float32),
    "net.0.bias": rng.normal(0, 0.5, (32,)).astype(np.float32),
    "net.2.weight": rng.normal(0, 1.0, (4, 32)).astype(np.float32),
    "net.2.bias": rng.normal(0, 0.5, (4,)).astype(np.float32),
  }
  lora = LoRAWeights.init(CONFIG, LoRAConfig(rank=2))
  folder = checkpoints.export(
    {"mapper": Mapper.create(kind, CONFIG.num_layers), "lora": lora}, str(tmp_path)
  )
  safetensors.numpy.save_file(old, os.path.join(folder, "mapper", "mapper.safetensors"))
  with open(os.path.join(folder, "mapper", "mapper_config.json"), "w") as f:
    json.dump({"kind": kind, "features": features, "num_layers": CONFIG.num_layers}, f)
  mapper, _ = checkpoints.load_export(folder, CONFIG)
  assert (mapper.features, mapper.hidden_dim) == (features, 32)

  lengths, num_workers, g, h = np.array([3, 0, 9]), 3, CONFIG.num_kv_heads, CONFIG.head_dim
  k = tuple(
    jnp.asarray(rng.normal(size=(3, 10, g, h)), jnp.float32) for _ in range(CONFIG.num_layers)
  )
  v = tuple(
    jnp.asarray(rng.normal(size=(3, 10, g, h)), jnp.float32) for _ in range(CONFIG.num_layers)
  )
  got = np.asarray(mapper.coefficients(k, v, jnp.asarray(lengths), jnp.asarray(num_workers)))
  # The old computation, in numpy: all three features, the dropped ones zero.
  f_len = np.log1p(np.maximum(lengths, 1)) * (features not in ("num_workers", "none"))
  f_num = np.full(3, np.log1p(num_workers)) * (features not in ("length", "none"))
  assert CONFIG.num_layers == 1  # so the layer feature is 0
  x = np.stack([f_len, f_num, np.zeros(3)], -1)[:, None, None, :]  # [K, L, 1, 3]
  if stats:
    s = np.asarray(cache_statistics(k, v, jnp.asarray(lengths)), np.float64)  # [K, L, G, 2]
    x = np.concatenate([np.broadcast_to(x, s.shape[:3] + (3,)), s], -1)
  hidden = x @ old["net.0.weight"].T.astype(np.float64) + old["net.0.bias"]
  r = (hidden / (1 + np.exp(-hidden))) @ old["net.2.weight"].T.astype(np.float64) + old[
    "net.2.bias"
  ]
  want = 0.1 * np.tanh(r) + np.array([1.0, 0.0, 1.0, 0.0])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_kill_and_resume_gives_the_uninterrupted_params(tmp_path, uninterrupted):
  _, want = uninterrupted
  workdir = str(tmp_path)
  stopped = trainer.train(_config(), workdir, stop_after=3)  # killed after step 3: last save at 2
  assert stopped.step == 3 and stopped.export_dir is None
  resumed = trainer.train(_config(), workdir)
  assert [row["step"] for row in resumed.history] == [3, 4, 5, 6]
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(want))
  assert resumed.skip_reasons == want.skip_reasons
  for got, ref in zip(resumed.history, want.history[2:], strict=True):
    assert got["loss"] == ref["loss"] and got["skipped_total"] == ref["skipped_total"]
  assert _logged_steps(workdir) == [1, 2, 3, 4, 5, 6]  # rows after step 2 were replaced


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_loses_nothing(
  tmp_path, uninterrupted, monkeypatch
):
  _, want = uninterrupted
  workdir = str(tmp_path)
  before = signal.getsignal(signal.SIGTERM)
  write = trainer.MetricsLog.write

  def write_then_sigterm(self, row):  # a `kill PID` arriving after step 2's check: 3 runs
    write(self, row)
    if row["step"] == 2:
      assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, before), "not handled"
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(trainer.MetricsLog, "write", write_then_sigterm)
  stopped = trainer.train(_config(), workdir)
  monkeypatch.undo()
  assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
  assert stopped.interrupted and stopped.step == 3 and stopped.export_dir is None
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  resumed = trainer.train(_config(), workdir)
  assert not resumed.interrupted and resumed.export_dir is not None
  assert [row["step"] for row in resumed.history] == [4, 5, 6]  # no step ran twice
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(want))
  assert _logged_steps(workdir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, uninterrupted):
  _, want = uninterrupted
  workdir = str(tmp_path)
  trainer.train(_config(), workdir, stop_after=5)  # saves at 2 and 4
  _damage(os.path.join(workdir, "checkpoints"), 4, "truncate")
  resumed = trainer.train(_config(), workdir)
  assert resumed.history[0]["step"] == 3  # step 4 was unreadable: resumed from 2
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(want))
  assert os.listdir(os.path.join(workdir, "checkpoints_corrupt"))[0].startswith("4-")


def test_traces_of_an_unregistered_task_fail_before_training(tmp_path):
  config = _config()
  path = tmp_path / "old.jsonl"  # written before traces named registered tasks
  row = {"id": "1", "task": "evidence", "question": "q", "branches": ["b"], "target": " x"}
  path.write_text(json.dumps(row) + "\n")
  config.data.update(source="jsonl", train_jsonl=str(path))
  with pytest.raises(ValueError, match=r"not registered: \['evidence'\]"):
    trainer.load_traces(config, str(tmp_path / "work"))
