"""The evaluation harness end to end on a tiny random model and a handful of examples."""

import json

import pytest

from psynth_jax import tasks, testing
from psynth_jax.eval import compare, workflow
from psynth_jax.language_model import LanguageModel
from psynth_jax.mapper import Mapper
from psynth_jax.model.config import ModelConfig
from psynth_jax.model.lora import LoRAConfig, LoRAWeights
from psynth_jax.model.transformer import init_params
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_tokenizer import SuiteTokenizer
from psynth_jax.tokenizer import Tokenizer

TASK = synthetic.TASK


@pytest.fixture(scope="module")
def lm():
  tok = SuiteTokenizer()
  config = ModelConfig(
    model_type="llama",
    vocab_size=tok.vocab_size,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
  )
  return LanguageModel(init_params(config, 0), tok, tok.eos_token_ids, tok.pad_token_id)


@pytest.fixture(scope="module")
def report(lm):
  # One family and K = 2: few distinct shapes, so few compiles.
  problems = TASK.load(split="test", limit=2, seed=0, families=("tools",), max_workers=2)
  n_layers = lm.config.num_layers
  lora = LoRAWeights.init(lm.config, LoRAConfig(rank=2, alpha=4.0))
  modes = workflow.cache_modes(
    mapper_only=Mapper.create("affine", n_layers),
    lora_only=lora,
    full={"affine": (Mapper.create("affine", n_layers), lora)},
  )
  return compare.compare_modes(
    lm,
    TASK,
    problems,
    modes,
    ttft_examples=1,
    ttft_repeats=1,
    lengths=(4, 8),
    length_workers=2,
    worker_max_new_tokens=8,
    answer_max_new_tokens=4,
    progress=False,
  )


def test_every_mode_scores_and_times(report):
  assert report.modes == [
    "single_agent",
    "text_synthesis",
    "naive_merge",
    "mapper_only",
    "lora_only",
    "parallel_synthesis/affine",
  ]
  for mode in report.modes:
    acc = report.accuracy[mode]
    assert 0.0 <= acc["overall"] <= 1.0
    assert set(acc) <= {*synthetic.FAMILIES, "overall"}
    assert report.ttft_s[mode] > 0
    # Tokenising is timed for every mode, apart from (never inside) its TTFT.
    assert report.tokenize_s[mode] > 0 and report.prompt_tokens[mode] > 0
  assert 0.0 <= report.workers["exact"] <= 1.0
  assert [r["length"] for r in report.ttft_by_length] == [4, 8]
  assert all(r["ratio"] > 0 for r in report.ttft_by_length)


def test_every_cache_mode_at_init_answers_like_the_naive_merge(lm):
  # A fresh mapper is the identity and a fresh LoRA (B = 0) adds nothing, so on the
  # same worker outputs every cache mode must give the naive merge's very tokens.
  problems = TASK.load(split="test", limit=3, seed=1, max_workers=2)
  n_layers = lm.config.num_layers
  lora = LoRAWeights.init(lm.config, LoRAConfig(rank=2, alpha=4.0), seed=3)
  modes = workflow.cache_modes(
    mapper_only=Mapper.create("affine", n_layers, seed=1),
    lora_only=lora,
    full={"head_affine": (Mapper.create("head_affine", n_layers, seed=2), lora)},
  )
  records = workflow.run_workflow(
    lm,
    TASK,
    problems,
    modes,
    single_agent=False,
    text=False,
    worker_max_new_tokens=8,
    answer_max_new_tokens=6,
    progress=False,
  )
  for rec in records:
    naive = rec.predictions[workflow.NAIVE_MERGE]
    assert {m.name: rec.predictions[m.name] for m in modes} == {m.name: naive for m in modes}


def test_ttft_by_length_counts_tokens(report):
  # Branch lengths are token counts on both paths (the suite tokenizer round-trips).
  for row in report.ttft_by_length:
    k = row["num_workers"]
    assert row["cache_branch_tokens"] == row["text_branch_tokens"] == k * row["length"]
    assert row["text_prompt_tokens"] > row["text_branch_tokens"]
    assert row["text_tokenize_s"] > 0 and row["cache_tokenize_s"] > 0


def test_branch_ids_cut_tokens(lm):
  ids = workflow.branch_ids(lm, "age: lea 7, kim 6", 11)
  assert len(ids) == 11 and lm.tokenizer.encode(lm.decode_text(ids)) == ids
  with pytest.raises(ValueError, match="empty"):
    workflow.branch_ids(lm, "", 4)


def test_measure_timings_per_mode(lm):
  problems = TASK.load(split="test", limit=1, seed=0, families=("tools",), max_workers=2)
  args = (lm, TASK, problems, [workflow.CacheMode(workflow.NAIVE_MERGE)], False, True, 1, 8, 4)
  timings = workflow.measure_timings(*args)
  assert set(timings) == {"text_synthesis", "naive_merge"}
  for t in timings.values():
    assert t["ttft_s"] > 0 and t["tokenize_s"] > 0 and t["prompt_tokens"] > 0


def test_modes_without_weights_are_skipped():
  assert [m.name for m in workflow.cache_modes()] == ["naive_merge"]


def test_outputs_written(report, tmp_path):
  table = compare.format_table(report)
  assert "text_synthesis" in table and "parallel_synthesis/affine" in table
  assert "tok ms" in table and "prefills" in table
  path = tmp_path / "out" / "report.json"
  compare.write_json(report, path)
  assert json.loads(path.read_text())["modes"] == report.modes
  assert compare.read_json(path) == report
  old = {k: v for k, v in report.to_json().items() if k not in ("tokenize_s", "prompt_tokens")}
  assert compare.Report.from_json(old).tokenize_s == {}  # reports from before still load
  png = tmp_path / "report.png"
  compare.plot(report, png)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_accuracy_counts_answers():
  records = [
    workflow.ExampleRecord("a", "tools", 2, "3", [], 1.0, 0.0, scores={"m": 1.0}),
    workflow.ExampleRecord("b", "tools", 2, "4", [], 1.0, 0.0, scores={"m": 0.0}),
    workflow.ExampleRecord("c", "evidence", 2, "x", [], 1.0, 0.0, scores={"m": 1.0}),
    workflow.ExampleRecord("d", "other", 2, "y", [], None, 0.0, scores={"m": 0.5}),
  ]
  got = workflow.accuracy(records, "m", synthetic.FAMILIES)
  # The task's families first, in its order; then the others as they appear.
  assert list(got) == ["evidence", "tools", "other", "overall"]
  assert got == {"evidence": 1.0, "tools": 0.5, "other": 0.5, "overall": 2.5 / 4}


def test_a_chat_task_runs_the_same_workflow(tmp_path):
  # Nothing in the workflow is suite-specific: chat prompts through a chat template,
  # K from `default_workers` (no gold branches), scores from the task.
  tok = Tokenizer.from_folder(testing.bpe_tokenizer_folder(tmp_path))
  config = testing.tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=1024)
  lm = LanguageModel(testing.random_params(config), tok, tok.eos_token_ids, tok.pad_token_id)
  task = tasks.get("chat")
  problems = [tasks.Problem("a", "What is 2+2?", "4"), tasks.Problem("b", "Name a fox.", "fox")]
  lora = LoRAWeights.init(config, LoRAConfig(rank=2, alpha=4.0))
  modes = workflow.cache_modes(full={"affine": (Mapper.create("affine", config.num_layers), lora)})
  records = workflow.run_workflow(
    lm, task, problems, modes, worker_max_new_tokens=4, answer_max_new_tokens=3, progress=False
  )
  for rec, p in zip(records, problems, strict=True):
    assert rec.num_workers == 3 and rec.worker_exact is None and len(rec.worker_texts) == 3
    for mode, text in rec.predictions.items():
      assert rec.scores[mode] == task.score(text, p)
    # At init the trained-adapter mode answers as the naive merge.
    assert rec.predictions["parallel_synthesis/affine"] == rec.predictions[workflow.NAIVE_MERGE]
  assert workflow.accuracy(records, workflow.NAIVE_MERGE).keys() == {"overall"}
