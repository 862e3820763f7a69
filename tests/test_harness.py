"""`psynth eval` end to end on a tiny random chat model: records, resuming, new modes, rescoring."""

import json
import os

import pytest

from psynth_jax import cli, testing
from psynth_jax.convert.release import load_adapter
from psynth_jax.eval import harness, stats
from psynth_jax.mapper import Mapper
from psynth_jax.model.checkpoint import save_converted
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.tasks import Problem
from psynth_jax.tokenizer import Tokenizer
from psynth_jax.train import checkpoints

CONFIG = "psynth_jax/configs/eval.py:chat"
BUDGET = ["--set", "worker_tokens=4", "--set", "answer_tokens=3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("harness")
  tok_dir = testing.bpe_tokenizer_folder(root / "tok")
  tok = Tokenizer.from_folder(tok_dir)
  config = testing.tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=1024)
  params = testing.random_params(config)
  save_converted(params, root / "model", tokenizer_src=tok_dir)
  problems = [Problem("p1", "What is 2+2?", "4"), Problem("p2", "Name a fox.", "fox")]
  problems.append(Problem("p3", "Is the sky blue?", "yes"))
  data = root / "problems.jsonl"
  data.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems))
  # A fresh mapper (identity) and LoRA (B = 0): an adapter that must answer as the naive merge.
  export = checkpoints.export(
    {
      "mapper": Mapper.create("affine", config.num_layers),
      "lora": LoRAWeights.init(config, LoRAConfig(rank=2)),
    },
    str(root / "export"),
  )
  return root, str(data), export


def _eval(root, data, workdir, *extra):
  argv = ["eval", "--config", CONFIG, "--workdir", str(workdir), "--set", f"path={data}", *BUDGET]
  cli.main(argv + list(extra))
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f), harness.read_records(os.path.join(workdir, harness.RECORDS))


def test_eval_records_resumes_and_adds_modes(setup, tmp_path, capsys):
  root, data, export = setup
  model = ["--model", str(root / "model")]
  summary, rows = _eval(root, data, tmp_path, *model, "--limit", "2")
  assert summary["num_problems"] == 2
  assert list(summary["modes"]) == ["single_agent", "text_synthesis", "naive_merge"]
  assert [r["kind"] for r in rows].count("workers") == 2 and len(rows) == 2 + 2 * 3
  # A re-run records nothing new; a kill mid-line loses only that line.
  _, again = _eval(root, data, tmp_path, *model, "--limit", "2")
  assert again == rows
  path = tmp_path / harness.RECORDS
  with open(path, "rb+") as f:
    f.truncate(os.path.getsize(path) - 7)
  _, resumed = _eval(root, data, tmp_path, *model, "--limit", "2")
  assert len(resumed) == len(rows) and resumed[:-1] == rows[:-1]
  # A new adapter on the same workdir: only its mode runs, on the recorded worker outputs
  # (caches rebuilt by prefill). At init it must answer exactly as the naive merge.
  summary, more = _eval(
    root, data, tmp_path, *model, "--limit", "2", "--adapter", f"fresh={export}"
  )
  assert [r["kind"] for r in more].count("workers") == 2 and len(more) == len(rows) + 2
  modes = {(r["id"], r["mode"]): r["prediction"] for r in more if r["kind"] == "mode"}
  for pid in ("p1", "p2"):
    assert modes[(pid, "fresh")] == modes[(pid, "naive_merge")]
  assert set(summary["paired_vs_text"]) == {"single_agent", "naive_merge", "fresh"}
  # Rescoring needs no model; other budgets on the same workdir are refused.
  rescored, _ = _eval(root, data, tmp_path, "--limit", "2", "--rescore")
  assert rescored["modes"] == summary["modes"] and rescored["rescored"]
  with pytest.raises(ValueError, match="another settings"):
    cli.main(
      [
        "eval",
        "--config",
        CONFIG,
        "--workdir",
        str(tmp_path),
        "--set",
        f"path={data}",
        *model,
        "--limit",
        "2",
      ]
    )
  assert (tmp_path / "summary.png").stat().st_size > 0
  assert "95% interval" in capsys.readouterr().out


def test_batched_problems_give_the_one_problem_records(setup, tmp_path):
  root, data, _ = setup
  model = ["--model", str(root / "model")]
  _, batched = _eval(root, data, tmp_path / "batched", *model, "--set", "batch_problems=3")
  _, single = _eval(root, data, tmp_path / "single", *model, "--set", "batch_problems=1")

  def content(rows):
    keep = ("kind", "id", "mode", "prompts", "outputs", "output_ids", "prediction", "score")
    return sorted(json.dumps({k: r[k] for k in keep if k in r}, sort_keys=True) for r in rows)

  assert len(batched) == 3 + 3 * 3 and content(batched) == content(single)
  assert all(r["ttft_s"] is None for r in batched if r["kind"] == "mode")
  assert all(r["ttft_s"] > 0 for r in single if r["kind"] == "mode")


def test_a_mesh_in_the_config_shards_the_run_and_changes_no_record(setup, tmp_path, capsys):
  root, data, _ = setup
  model = ["--model", str(root / "model"), "--limit", "2", "--set", "batch_problems=2"]
  _, sharded = _eval(root, data, tmp_path / "sharded", *model, "--set", "mesh=1,2,2")
  assert "on mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in capsys.readouterr().out
  _, single = _eval(root, data, tmp_path / "single", *model)
  keep = ("kind", "id", "mode", "outputs", "output_ids", "prediction", "score")
  assert [{k: r.get(k) for k in keep} for r in sharded] == [
    {k: r.get(k) for k in keep} for r in single
  ]


def test_merge_operators_run_as_modes_on_the_recorded_workers(setup, tmp_path):
  """`--operator`: a training-free operator answers from the same worker outputs; recompute
  of nothing is the naive merge, and a spec is bound to its mode name in run.json."""
  root, data, _ = setup
  model = ["--model", str(root / "model"), "--limit", "2"]
  ops = ["--operator", "recompute:fraction=0", "--operator", "sequential"]
  summary, rows = _eval(root, data, tmp_path, *model, *ops)
  assert list(summary["modes"])[-2:] == ["recompute/0", "sequential"]
  modes = {(r["id"], r["mode"]): r["prediction"] for r in rows if r["kind"] == "mode"}
  for pid in ("p1", "p2"):
    assert modes[(pid, "recompute/0")] == modes[(pid, "naive_merge")]
  run = json.loads((tmp_path / harness.RUN).read_text())
  assert run["adapters"]["sequential"] == "operator:sequential"
  with pytest.raises(SystemExit, match="KEY=VALUE"):
    _eval(root, data, tmp_path, *model, "--operator", "recompute:0.3")
  with pytest.raises(SystemExit, match="unknown merge operator"):
    _eval(root, data, tmp_path, *model, "--operator", "blend")
  with pytest.raises(SystemExit, match="fracton"):
    _eval(root, data, tmp_path, *model, "--operator", "recompute:fracton=0.3")


def test_bad_config_overrides_and_adapters_are_refused(setup, tmp_path):
  root, data, _ = setup
  with pytest.raises(SystemExit, match="KEY=VALUE"):
    cli.main(["eval", "--config", CONFIG, "--workdir", str(tmp_path), "--set", "budget=3"])
  with pytest.raises(SystemExit, match="benchmark tasks"):
    cli.main(["eval", "--config", CONFIG, "--workdir", str(tmp_path), "--set", "templates=x.json"])
  with pytest.raises(FileNotFoundError, match="not an adapter"):
    load_adapter(str(tmp_path))


def test_select_is_a_fixed_seed_subset_in_upstream_order():
  problems = [Problem(str(i), "q") for i in range(50)]
  a = harness.select(problems, 10, seed=3)
  assert a == harness.select(problems, 10, seed=3) and a != harness.select(problems, 10, seed=4)
  assert [int(p.id) for p in a] == sorted(int(p.id) for p in a)
  assert harness.select(problems, 5) == problems[:5] and harness.select(problems, 0) == problems


def test_wilson_interval_and_mcnemar():
  lo, hi = stats.wilson_interval(0, 10)
  assert lo == 0.0 and 0.25 < hi < 0.35  # 0/10 is not "surely 0 %"
  lo, hi = stats.wilson_interval(82, 164)
  assert lo < 0.5 < hi and hi - lo < 0.16
  # 10 discordant problems all one way: p = 2 / 2**10.
  a, b = [1] * 10 + [1] * 5, [0] * 10 + [1] * 5
  assert stats.mcnemar_exact(a, b) == {"a_only": 10, "b_only": 0, "p_value": 2 / 1024}
  assert stats.mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0
  with pytest.raises(ValueError, match="0/1"):
    stats.mcnemar_exact([0.5], [1])
