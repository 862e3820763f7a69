r"""Rebuilds the synthetic reproduction from scratch: base model, every adapter, evaluation.

  python experiments/reproduce_synthetic.py --config psynth_jax/configs/synthetic.py --workdir runs/synthetic
  python experiments/reproduce_synthetic.py --config psynth_jax/configs/synthetic.py --workdir runs/synthetic \
    --install    # then copy the result into psynth_jax/assets (what `psynth demo` ships)

On a 2-core CPU this takes about 3 hours: ~30 + ~60 + ~50 minutes to
pretrain the base model in three phases (`config.pretrain`, then
`config.pretrain_more.phase2` and `.phase3`, each continuing from the one before),
~9 per adapter (`config.reproduce.adapters`, `adapter_steps` steps each) and ~4
to evaluate every mode on `reproduce.eval_examples` test examples.
Each stage is skipped when its output
already exists in the workdir, so an interrupted run continues where it
stopped (the adapter trainer also resumes mid-run from its checkpoints).

Stages and outputs (under --workdir):
  synthetic_base_phase1/   first pretraining phase (+ pretrain_info.json), then _phase2, ...
  synthetic_base/          pretrained base model: the last phase (+ its pretrain_info.json)
  adapters/<name>/         trainer workdir; adapters/<name>/export the mapper + LoRA
  report.json, report.png  accuracy per mode and family, TTFT per mode, TTFT by length
  synthetic_results.json   the figures the shipped-model tests re-check
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time

from absl import app, flags, logging
from ml_collections import config_flags

from psynth_jax.eval import compare, shipped
from psynth_jax.tasks import synthetic
from psynth_jax.tasks.synthetic_pretrain import (
  EVAL_SEED,
  PretrainConfig,
  evaluate,
  pretrain_and_save,
)
from psynth_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
  "config", "psynth_jax/configs/synthetic.py", "psynth_jax/configs/synthetic.py", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/synthetic", "every stage's output goes here")
_INSTALL = flags.DEFINE_bool("install", False, "copy the models and results into psynth_jax/assets")


def _pretrain_phase(config, overrides: dict, out: str, label: str) -> None:
  pre = PretrainConfig.from_dict({**config.pretrain.to_dict(), **overrides})
  print(f"[1/3] {label}: {pre.steps} steps" + (f" from {pre.init_from}" if pre.init_from else ""))
  pretrain_and_save(pre, out, config.reproduce.check_examples)


def pretrain_phases(config) -> list[tuple[str, dict]]:
  """[(name, overrides of config.pretrain)]: phase1 = config.pretrain itself, then
  `config.pretrain_more.phase2`, `.phase3`, ... in order, each continuing from the one before."""
  more = config.get("pretrain_more", {})
  more = more.to_dict() if hasattr(more, "to_dict") else dict(more)
  want = [f"phase{i}" for i in range(2, len(more) + 2)]
  if set(more) != set(want):
    raise ValueError(
      f"config.pretrain_more must hold {want} (consecutive phases), got {sorted(more)}"
    )
  return [("phase1", {})] + [(name, dict(more[name])) for name in want]


def pretrain_stage(config, out: str) -> None:
  """Pretrains the base model phase by phase; phase i goes to `out`_phase<i> and the last
  one to `out`. Each later phase starts from the previous one with a fresh optimizer and
  schedule; a phase whose folder exists is skipped."""
  if os.path.exists(os.path.join(out, "model.safetensors")):
    print(f"[1/3] base model: {out} exists, skipping pretraining")
    return
  phases = pretrain_phases(config)
  previous = None
  for i, (name, overrides) in enumerate(phases):
    last = i == len(phases) - 1
    path = out if last else f"{out}_{name}"
    if not last and os.path.exists(os.path.join(path, "model.safetensors")):
      print(f"[1/3] {name}: {path} exists, skipping it")
    else:
      if previous:
        overrides = {**overrides, "init_from": previous}
      _pretrain_phase(config, overrides, path, f"pretraining the base model, {name}")
    previous = path


def adapter_stage(config, base: str, workdir: str) -> dict[str, str]:
  exports = {}
  names = list(config.reproduce.adapters)
  for i, name in enumerate(names):
    trainable, kind = config.reproduce.adapters[name]
    run_dir = os.path.join(workdir, "adapters", name)
    export = os.path.join(run_dir, "export")
    exports[name] = export
    if os.path.exists(os.path.join(export, "mapper", "mapper_config.json")):
      print(f"[2/3] adapter {i + 1}/{len(names)} {name}: {export} exists, skipping")
      continue
    print(f"[2/3] adapter {i + 1}/{len(names)} {name}: trainable={trainable}, mapper={kind}")
    c = config.copy_and_resolve_references()
    c.model.path = base
    c.train.trainable = trainable
    c.mapper.kind = kind
    c.train.num_steps = config.reproduce.adapter_steps
    t0 = time.perf_counter()
    result = trainer.train(c, run_dir)
    last = result.history[-1] if result.history else {}
    info = {
      "trainable": trainable,
      "mapper": kind,
      "steps": result.step,
      "final_loss": last.get("loss"),
      "train_wall_s": time.perf_counter() - t0,
      "skip_reasons": result.skip_reasons,
    }
    with open(os.path.join(export, "train_info.json"), "w") as f:
      json.dump(info, f, indent=2)
    print(f"  loss {last.get('loss'):.4f} after {result.step} steps")
  return exports


def evaluate_stage(config, base: str, exports: dict[str, str], workdir: str) -> dict:
  print("[3/3] evaluating every mode on the test split")
  lm = shipped.load_synthetic_base(base)
  staged = os.path.join(workdir, "adapters_staged")
  shutil.rmtree(staged, ignore_errors=True)
  for name, export in exports.items():
    shutil.copytree(export, os.path.join(staged, name))
  modes = shipped.load_synthetic_modes(lm.config, staged)
  r = config.reproduce
  task = synthetic.TASK
  problems = task.load(split="test", limit=r.eval_examples, seed=EVAL_SEED)
  report = compare.compare_modes(
    lm,
    task,
    problems,
    modes,
    ttft_examples=r.ttft_examples,
    lengths=tuple(r.lengths),
    meta={"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine()},
  )
  print(compare.format_table(report))
  compare.write_json(report, os.path.join(workdir, "report.json"))
  compare.plot(report, os.path.join(workdir, "report.png"))
  # The check: the same workflow on the first `check_examples` (a prefix of the above).
  check = compare.compare_modes(
    lm, task, problems[: r.check_examples], modes, ttft_examples=0, lengths=(), progress=False
  )
  results = {
    "date": time.strftime("%Y-%m-%d"),
    "split": "test",
    "seed": EVAL_SEED,
    "eval_examples": r.eval_examples,
    "accuracy": report.accuracy,
    "ttft_s": report.ttft_s,
    "workers": report.workers,
    "check_examples": r.check_examples,
    "check_accuracy": {m: a["overall"] for m, a in check.accuracy.items()},
    "gold_text_synthesis": evaluate(
      lm, [synthetic.Example.of(p) for p in problems[: r.check_examples]]
    )["text"],
  }
  with open(os.path.join(workdir, "synthetic_results.json"), "w") as f:
    json.dump(results, f, indent=2)
  return results


def install(workdir: str, exports: dict[str, str]) -> None:
  shutil.rmtree(shipped.SYNTHETIC_BASE, ignore_errors=True)
  shutil.copytree(os.path.join(workdir, "synthetic_base"), shipped.SYNTHETIC_BASE)
  shutil.rmtree(shipped.SYNTHETIC_ADAPTERS, ignore_errors=True)
  for name, export in exports.items():
    shutil.copytree(export, os.path.join(shipped.SYNTHETIC_ADAPTERS, name))
  shutil.copy(os.path.join(workdir, "synthetic_results.json"), shipped.SYNTHETIC_RESULTS)
  print(f"installed into {shipped.ASSETS}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config, workdir = _CONFIG.value, _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  base = os.path.abspath(os.path.join(workdir, "synthetic_base"))
  pretrain_stage(config, base)
  exports = adapter_stage(config, base, workdir)
  evaluate_stage(config, base, exports, workdir)
  if _INSTALL.value:
    install(workdir, exports)
  print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; outputs in {workdir}")


if __name__ == "__main__":
  app.run(main)
