r"""Writes distillation traces: worker branches + the text-concatenation synthesizer's output.

For every problem of a task the workers' outputs become the branches (the
model's own with `run_workers`, else the problem's gold branches) and the base
model's text synthesis (every branch pasted into the task's text-synthesis
prompt) becomes the target, one JSONL row per problem in the trainer's schema
(`psynth_jax.train.data`). Greedy decoding, as in the paper. Commands: see
`psynth_jax/configs/traces.py`.

Resumable: rows already in `out` are kept (a half-written last line from a
kill is dropped) and only the missing ids are generated.
"""

import json
import os

from absl import app
from ml_collections import config_flags

from psynth_jax import tasks
from psynth_jax.eval import harness
from psynth_jax.language_model import load_pretrained
from psynth_jax.train import data
from psynth_jax.workers import run_workers

_CONFIG = config_flags.DEFINE_config_file(
  "config", "psynth_jax/configs/traces.py", "psynth_jax/configs/traces.py[:arg]", lock_config=True
)


def trace_row(task, problem, lm, config) -> dict:
  """The problem's trace with an empty target: its branches and the prompts their workers saw."""
  branches = None  # the problem's gold branches
  if config.run_workers:
    k = len(problem.meta.get("branches", ())) or config.num_workers
    ids = [task.encode(lm.tokenizer, p) for p in task.worker_prompts(problem, k)]
    outputs = run_workers(lm, ids, config.max_new_tokens).texts
    branches = [task.branch_from_output(o) for o in outputs]
  return data.gold_trace(task, problem, branches, target="")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if not config.out:
    raise app.UsageError("set --config.out (the JSONL to write)")
  task = tasks.get(config.task)
  lm = load_pretrained(os.path.expanduser(config.model))
  if lm.tokenizer is None:
    raise app.UsageError(f"{config.model} has no tokenizer")
  problems = task.load(
    config.path or None,
    split=config.split,
    limit=config.num,
    seed=config.seed,
    **config.task_options.to_dict(),
  )
  os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
  # Ids already written; a half-written last line (a kill) is cut off and made again.
  done = {str(row["id"]) for row in harness.read_records(config.out)}
  todo = [p for p in problems if p.id not in done]
  print(f"{len(done)} traces already in {config.out}, {len(todo)} to generate")
  for start in range(0, len(todo), config.batch_size):
    rows = [trace_row(task, p, lm, config) for p in todo[start : start + config.batch_size]]
    problems_of = {p.id: p for p in todo[start : start + config.batch_size]}
    teacher = [
      task.encode(lm.tokenizer, task.text_synthesis_prompt(problems_of[r["id"]], r["branches"]))
      for r in rows
    ]
    for row, ids in zip(rows, lm.generate(teacher, config.max_new_tokens), strict=True):
      row["target"] = lm.decode_text(ids)
    with open(config.out, "a", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
      f.flush()
      os.fsync(f.fileno())
    print(f"{len(done) + start + len(rows)} / {len(problems)}")


if __name__ == "__main__":
  app.run(main)
