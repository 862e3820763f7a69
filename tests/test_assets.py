"""The models that ship in the package: small, loadable, and as accurate as recorded.

`psynth_jax/assets/synthetic_results.json` holds what
experiments/reproduce_synthetic.py measured when it built them; the checks
re-run the same greedy evaluation on the same fixed test subset. On another
CPU, float rounding can flip a near-tie in a greedy decode, so each accuracy
may differ by a few examples: the tolerance is 5 points (3 of 60 examples) for
text synthesis overall, 10 points per family (20 examples each) and per cache
mode (whose workers' outputs can flip too).
"""

import json
import os

import pytest

from psynth_jax.eval import compare, demo, shipped, workflow
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_pretrain import evaluate

TOLERANCE = 0.05


@pytest.fixture(scope="module")
def lm():
  return shipped.load_synthetic_base()


@pytest.fixture(scope="module")
def recorded():
  return shipped.recorded_results()


def test_assets_are_small_and_complete():
  total = 0
  for root, _, files in os.walk(shipped.ASSETS):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  assert total < 20e6, f"shipped assets are {total / 1e6:.1f} MB"
  for name in shipped.ADAPTER_MODES:
    folder = os.path.join(shipped.SYNTHETIC_ADAPTERS, name)
    assert os.path.exists(os.path.join(folder, "mapper", "mapper_config.json")), name
    with open(os.path.join(folder, "train_info.json")) as f:
      assert json.load(f)["steps"] > 0


def test_base_model_reproduces_recorded_text_synthesis(lm, recorded):
  examples = synthetic.generate("test", recorded["check_examples"], recorded["seed"])
  got = evaluate(lm, examples)["text"]
  want = recorded["gold_text_synthesis"]
  for family in (*synthetic.FAMILIES, "overall"):
    assert got[family] == pytest.approx(want[family], abs=2 * TOLERANCE), family
  assert got["overall"] == pytest.approx(want["overall"], abs=TOLERANCE)


def test_every_mode_reproduces_its_recorded_accuracy(lm, recorded):
  modes = shipped.load_synthetic_modes(lm.config)
  assert [m.name for m in modes] == [workflow.NAIVE_MERGE, *shipped.ADAPTER_MODES.values()]
  task = synthetic.TASK
  problems = task.load(split="test", limit=recorded["check_examples"], seed=recorded["seed"])
  report = compare.compare_modes(
    lm, task, problems, modes, ttft_examples=0, lengths=(), progress=False
  )
  got = {mode: acc["overall"] for mode, acc in report.accuracy.items()}
  assert got == pytest.approx(recorded["check_accuracy"], abs=2 * TOLERANCE)


def test_missing_assets_name_the_rebuild_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="reproduce_synthetic"):
    shipped.load_synthetic_base(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="reproduce_synthetic"):
    shipped.load_synthetic_modes(None, str(tmp_path))


def test_demo_runs_end_to_end(tmp_path, capsys):
  # A user's export: here the shipped PS adapter again, so it must score exactly as that mode.
  mine = {"mine": os.path.join(shipped.SYNTHETIC_ADAPTERS, "parallel_synthesis_affine")}
  report = demo.run(
    num_examples=3, lengths=(16,), ttft_examples=1, out=str(tmp_path), adapters=mine
  )
  assert set(report.modes) >= {workflow.TEXT_SYNTHESIS, workflow.NAIVE_MERGE, "mine"}
  assert report.accuracy["mine"] == report.accuracy["parallel_synthesis/affine"]
  assert all(t > 0 for t in report.ttft_s.values())
  assert report.ttft_by_length[0]["ratio"] > 0
  assert (tmp_path / "demo.png").stat().st_size > 0
  assert compare.read_json(tmp_path / "demo.json").accuracy == report.accuracy
  assert "text_synthesis" in capsys.readouterr().out


def test_demo_adapter_flags_are_checked():
  assert demo.parse_adapters(["a=x", "b=y=z"]) == {"a": "x", "b": "y=z"}
  for bad in (["a"], ["=x"], ["a="], ["a=x", "a=y"]):
    with pytest.raises(ValueError, match="--adapter"):
      demo.parse_adapters(bad)
  for name in ("lora_only", workflow.TEXT_SYNTHESIS):
    with pytest.raises(ValueError, match="taken"):
      demo.run(num_examples=1, lengths=(), ttft_examples=0, adapters={name: "x"})
