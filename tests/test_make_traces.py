"""experiments/make_traces.py: traces carry the prompts their workers saw, and resume."""

import json
import os
import subprocess
import sys

from psynth_jax.configs import synthetic as synthetic_config
from psynth_jax.model.transformer import init_params
from psynth_jax.tasks import synthetic
from psynth_jax.tasks import synthetic_pretrain as pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = pretrain.PretrainConfig.from_dict(
  {
    **synthetic_config.get_config().pretrain.to_dict(),
    **dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
  }
)


def _make_traces(model, out, *flags):
  cmd = [sys.executable, os.path.join(REPO, "experiments/make_traces.py")]
  cmd += [f"--config.model={model}", f"--config.out={out}", "--config.num=3"]
  cmd += ["--config.task_options.max_workers=3", "--config.max_new_tokens=6"]
  cmd += ["--config.batch_size=2"]
  result = subprocess.run(cmd + list(flags), capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def test_worker_traces_record_prompts_and_resume(tmp_path):
  model = str(tmp_path / "base")
  lm = pretrain.language_model(init_params(TINY.model_config(), 0))
  pretrain.save_base(lm, model, {"note": "random init"})
  out = str(tmp_path / "traces.jsonl")
  _make_traces(model, out, "--config.run_workers=True")
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  examples = synthetic.generate("train", 3, 0, None, 2, 3)
  assert [r["id"] for r in rows] == [e.id for e in examples]
  for row, example in zip(rows, examples, strict=True):
    # The trainer rebuilds each worker's prompt from these and re-encodes its branch after it.
    assert row["task"] == "synthetic" and row["family"] == example.family
    k = len(example.branches)
    assert row["worker_prompts"] == [synthetic.worker_prompt_text(example, i) for i in range(k)]
    assert len(row["branches"]) == k
    prompts = [lm.tokenizer.encode(synthetic.worker_prompt_text(example, i)) for i in range(k)]
    outputs = pretrain.generate_batched(lm, prompts, 6, batch_size=4)
    expected = [synthetic.branch_from_output(lm.tokenizer.decode(o)) for o in outputs]
    assert row["branches"] == expected
    assert isinstance(row["target"], str) and row["synth_prompt"]
  # A killed run leaves a partial last line: it is dropped and that row made again.
  with open(out, "rb+") as f:
    f.truncate(os.path.getsize(out) - 5)
  assert "2 traces already" in _make_traces(model, out, "--config.run_workers=True")
  with open(out) as f:
    assert [json.loads(line) for line in f] == rows
