r"""Writes distillation traces: worker branches + the text-concatenation synthesizer's output.

For every task the workers' outputs become the branches and the base model's
text synthesis (every branch pasted into one prompt, `batching.teacher_prompt`)
becomes the target, one JSONL row per task in the trainer's schema
(`psynth_jax.train.data`). Greedy decoding, as in the paper.

  # synthetic suite: branches from the generator, targets from the shipped base
  python experiments/make_traces.py --model psynth_jax/assets/synthetic_base \
    --source synthetic --split train --num 2000 --out /tmp/psynth/traces/synthetic.jsonl

  # the same with Qwen2.5-Coder-0.5B, its chat template, and the model as workers too
  python experiments/make_traces.py --model ~/.cache/psynth_jax/models/qwen2.5-coder-0.5b-instruct \
    --prompt_format chat --run_workers --num 200 --out /tmp/psynth/traces/qwen05.jsonl

  # your own tasks: JSONL rows {id, task, question[, branches | worker_prompts]};
  # with --run_workers and no worker_prompts, --num_workers workers per question
  python experiments/make_traces.py --model PATH --source jsonl:/data/tasks.jsonl --out OUT

Resumable: rows already in --out are kept (a half-written last line from a
kill is dropped) and only the missing ids are generated.
"""

import json
import os

from absl import app, flags

from psynth_jax.language_model import load_pretrained
from psynth_jax.tasks import chat, synthetic
from psynth_jax.train import batching
from psynth_jax.workers import run_workers

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "converted model folder (or HF folder / .gguf)")
flags.DEFINE_string("source", "synthetic", "'synthetic' or 'jsonl:PATH'")
flags.DEFINE_string("split", "train", "synthetic split")
flags.DEFINE_integer("num", 1000, "synthetic examples")
flags.DEFINE_integer("seed", 0, "synthetic suite seed")
flags.DEFINE_integer("max_workers", synthetic.MAX_WORKERS, "synthetic: largest K")
flags.DEFINE_enum("prompt_format", "synthetic", sorted(batching.PROMPT_FORMATS), "prompt format")
flags.DEFINE_bool("run_workers", False, "decode the branches with the model from worker prompts")
flags.DEFINE_integer("num_workers", 3, "workers per task without worker_prompts (chat format)")
flags.DEFINE_integer("max_new_tokens", 64, "tokens per worker output and per target")
flags.DEFINE_integer("batch_size", 8, "targets generated together")
flags.DEFINE_string("out", None, "output JSONL")
flags.mark_flags_as_required(["model", "out"])


def load_tasks() -> list[dict]:
  if FLAGS.source == "synthetic":
    examples = synthetic.generate(FLAGS.split, FLAGS.num, FLAGS.seed, None, 2, FLAGS.max_workers)
    return [e.to_json() for e in examples]
  if FLAGS.source.startswith("jsonl:"):
    with open(FLAGS.source[len("jsonl:") :], encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]
  raise app.UsageError(f"--source must be 'synthetic' or 'jsonl:PATH', got {FLAGS.source!r}")


def done_ids(path: str) -> set[str]:
  """Ids already written; drops a partial last line left by a kill."""
  if not os.path.exists(path):
    return set()
  ids, good = set(), 0
  with open(path, "rb") as f:
    for line in f:
      if not line.endswith(b"\n"):
        break
      try:
        ids.add(json.loads(line)["id"])
      except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        break
      good += len(line)
  with open(path, "r+b") as f:
    f.truncate(good)
  return ids


def worker_prompts_of(task: dict, k: int) -> list[str]:
  """What the trainer's prompt format reads as worker i's prompt (`worker_prompts[i]`):
  the suite's instruction lines, or the whole chat user message."""
  if FLAGS.prompt_format == "synthetic":
    return list(task["worker_prompts"])
  messages = [chat.worker_message(task["question"], i, k) for i in range(k)]
  if task.get("worker_prompts"):
    messages = [f"{m}\n{extra}" for m, extra in zip(messages, task["worker_prompts"], strict=True)]
  return messages


def branches_of(task: dict, lm) -> tuple[list[str], list[str] | None]:
  """(branches, worker prompts as the trainer reads them, or None if unknown)."""
  if not FLAGS.run_workers and "branches" in task:
    return list(task["branches"]), task.get("worker_prompts") or None
  if FLAGS.prompt_format == "synthetic" and not task.get("worker_prompts"):
    raise ValueError(f"task {task['id']!r} has neither branches nor worker_prompts")
  k = len(task.get("worker_prompts") or ()) or FLAGS.num_workers
  record = {"question": task["question"], "worker_prompts": worker_prompts_of(task, k)}
  token_lists = [
    lm.tokenizer.encode(batching.worker_prompt(record, i, FLAGS.prompt_format, lm.tokenizer))
    for i in range(k)
  ]
  outputs = run_workers(lm, token_lists, FLAGS.max_new_tokens).texts
  # The trainer re-encodes each branch after its prompt as the worker wrote it.
  branches = [batching.branch_from_output(o, FLAGS.prompt_format) for o in outputs]
  return branches, record["worker_prompts"]


def main(argv):
  del argv
  lm = load_pretrained(os.path.expanduser(FLAGS.model))
  if lm.tokenizer is None:
    raise app.UsageError(f"{FLAGS.model} has no tokenizer")
  tasks = load_tasks()
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  done = done_ids(FLAGS.out)
  todo = [t for t in tasks if str(t["id"]) not in done]
  print(f"{len(done)} traces already in {FLAGS.out}, {len(todo)} to generate")
  fmt, tok = FLAGS.prompt_format, lm.tokenizer
  for start in range(0, len(todo), FLAGS.batch_size):
    rows = []
    for task in todo[start : start + FLAGS.batch_size]:
      branches, worker_prompts = branches_of(task, lm)
      row = {
        "id": str(task["id"]),
        "task": task.get("task", ""),
        "question": task["question"],
        "branches": branches,
      }
      if worker_prompts:
        row["worker_prompts"] = worker_prompts
      row["synth_prompt"] = batching.synth_prompt({**row, "synth_prompt": ""}, fmt, tok)
      rows.append(row)
    teacher_ids = [tok.encode(batching.teacher_prompt(r, fmt, tok)) for r in rows]
    for row, ids in zip(rows, lm.generate(teacher_ids, FLAGS.max_new_tokens), strict=True):
      row["target"] = lm.decode_text(ids)
    with open(FLAGS.out, "a", encoding="utf-8") as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
      f.flush()
      os.fsync(f.fileno())
    print(f"{len(done) + start + len(rows)} / {len(tasks)}")


if __name__ == "__main__":
  app.run(main)
