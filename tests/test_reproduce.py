"""experiments/reproduce_synthetic.py end to end at toy sizes: every stage, resumable, installable.

The real run takes about 3 hours on 2 cores; here the base model gets a few steps, each
adapter two, so accuracies are meaningless: the test checks the plumbing (files,
reports, skipping finished stages) that the shipped assets rely on.
"""

import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  reproduce = _load("reproduce_synthetic", "experiments/reproduce_synthetic.py")
  config = _load("synthetic_config", "psynth_jax/configs/synthetic.py").get_config("tiny,fast")
  config.pretrain.update(
    hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=4, copy_steps=2,
    batch_tokens=640, train_examples=40, eval_every=0, eval_examples=3, max_new_tokens=8,
  )  # fmt: skip
  # Each later phase continues from the one before.
  config.pretrain_more.phase2.update(steps=3)
  config.pretrain_more.phase3.update(steps=2, train_examples=40, eval_every=0)
  config.data.num_examples = 16
  config.data.task_options.max_workers = 4
  config.batch.update(batch_size=8)  # one row per emulated device
  config.reproduce.update(
    adapter_steps=2, eval_examples=3, check_examples=2, ttft_examples=1, lengths=(8,)
  )
  workdir = str(tmp_path_factory.mktemp("reproduce"))
  base = os.path.join(workdir, "synthetic_base")
  reproduce.pretrain_stage(config, base)
  exports = reproduce.adapter_stage(config, base, workdir)
  results = reproduce.evaluate_stage(config, base, exports, workdir)
  return reproduce, config, workdir, base, exports, results


def test_every_stage_writes_its_outputs(run):
  _, config, workdir, base, exports, results = run
  with open(os.path.join(base + "_phase1", "pretrain_info.json")) as f:
    assert json.load(f)["config"]["steps"] == 4
  with open(os.path.join(base + "_phase2", "pretrain_info.json")) as f:
    info = json.load(f)["config"]
  assert info["steps"] == 3 and info["init_from"] == base + "_phase1"
  with open(os.path.join(base, "pretrain_info.json")) as f:
    info = json.load(f)["config"]
  assert info["steps"] == 2 and info["init_from"] == base + "_phase2" and info["seed"] == 3
  assert set(exports) == set(config.reproduce.adapters)
  for export in exports.values():
    with open(os.path.join(export, "train_info.json")) as f:
      assert json.load(f)["steps"] == 2
  assert os.path.getsize(os.path.join(workdir, "report.png")) > 0
  modes = set(results["accuracy"])
  assert {"single_agent", "text_synthesis", "naive_merge", "parallel_synthesis/affine"} <= modes
  assert set(results["check_accuracy"]) == modes and results["check_examples"] == 2
  assert 0 <= results["gold_text_synthesis"]["overall"] <= 1


def test_finished_stages_are_skipped(run, capsys):
  reproduce, config, workdir, base, exports, _ = run
  before = os.path.getmtime(os.path.join(base, "model.safetensors"))
  reproduce.pretrain_stage(config, base)
  assert reproduce.adapter_stage(config, base, workdir) == exports
  out = capsys.readouterr().out
  assert "skipping pretraining" in out and out.count("exists, skipping") == len(exports) + 1
  assert os.path.getmtime(os.path.join(base, "model.safetensors")) == before


def test_install_copies_into_the_asset_folders(run, tmp_path, monkeypatch):
  reproduce, _, workdir, _, exports, _ = run
  from psynth_jax.eval import shipped

  for name in ("SYNTHETIC_BASE", "SYNTHETIC_ADAPTERS", "SYNTHETIC_RESULTS"):
    monkeypatch.setattr(shipped, name, str(tmp_path / os.path.basename(getattr(shipped, name))))
  reproduce.install(workdir, exports)
  lm = shipped.load_synthetic_base(shipped.SYNTHETIC_BASE)
  modes = shipped.load_synthetic_modes(lm.config, shipped.SYNTHETIC_ADAPTERS)
  assert len(modes) == 1 + len(shipped.ADAPTER_MODES)
  assert shipped.recorded_results(shipped.SYNTHETIC_RESULTS)["check_examples"] == 2


def test_pretrain_phases_must_be_consecutive(run):
  reproduce, config, *_ = run
  assert [name for name, _ in reproduce.pretrain_phases(config)] == ["phase1", "phase2", "phase3"]
  broken = config.copy_and_resolve_references()
  del broken.pretrain_more["phase2"]
  with pytest.raises(ValueError, match="consecutive"):
    reproduce.pretrain_phases(broken)
