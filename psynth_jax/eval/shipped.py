"""The built-in synthetic-suite models that ship in `psynth_jax/assets/` (a few MB, no download).

The folder holds data only; this module names its files and loads them:

* `synthetic_base/`: a small Llama (word-level suite vocabulary) pretrained from scratch on the
  suite (`psynth_jax.tasks.synthetic_pretrain`), as a converted model folder with its
  `pretrain_info.json` (config, timings, validation history, test accuracy).
* `synthetic_adapters/<name>/`: mapper + LoRA exports of the trainer
  (`psynth_jax.train.checkpoints.export`) for that base model, one per cache mode:
  `mapper_only`, `lora_only` and `parallel_synthesis_<mapper kind>`; each with
  the `train_info.json` of its run.
* `synthetic_results.json`: the accuracy `experiments/reproduce_synthetic.py`
  recorded for each mode on the fixed test subset it names (the shipped-model
  tests check it is reproduced).

All of it is rebuilt by `python experiments/reproduce_synthetic.py`.
"""

from __future__ import annotations

import json
import os

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SYNTHETIC_BASE = os.path.join(ASSETS, "synthetic_base")
SYNTHETIC_ADAPTERS = os.path.join(ASSETS, "synthetic_adapters")
SYNTHETIC_RESULTS = os.path.join(ASSETS, "synthetic_results.json")
# Adapter folder -> cache mode name of `psynth_jax.eval.workflow`, in display order.
ADAPTER_MODES = {
  "mapper_only": "mapper_only",
  "lora_only": "lora_only",
  "parallel_synthesis_affine": "parallel_synthesis/affine",
  "parallel_synthesis_head_affine": "parallel_synthesis/head_affine",
}
_REBUILD = "rebuild it with `python experiments/reproduce_synthetic.py`"


def load_synthetic_base(folder: str = SYNTHETIC_BASE):
  """The shipped base model as a `LanguageModel` with the suite tokenizer."""
  from psynth_jax.language_model import load_pretrained
  from psynth_jax.tasks.synthetic_pretrain import language_model

  if not os.path.exists(os.path.join(folder, "model.safetensors")):
    raise FileNotFoundError(f"no synthetic base model in {folder}; {_REBUILD}")
  return language_model(load_pretrained(folder).params)


def load_synthetic_modes(model_config, folder: str = SYNTHETIC_ADAPTERS) -> list:
  """Every cache mode: the naive merge, then each shipped adapter (`workflow.CacheMode`s).

  `mapper_only` keeps only the mapper and `lora_only` only the LoRA of their
  exports (the other part was frozen at its identity/zero init in training).
  """
  from psynth_jax.eval.workflow import NAIVE_MERGE, CacheMode
  from psynth_jax.train.checkpoints import load_export

  modes = [CacheMode(NAIVE_MERGE)]
  for name, mode in ADAPTER_MODES.items():
    path = os.path.join(folder, name)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no {name} adapter in {folder}; {_REBUILD}")
    mapper, lora = load_export(path, model_config)
    modes.append(
      CacheMode(
        mode,
        mapper=None if name == "lora_only" else mapper,
        lora=None if name == "mapper_only" else lora,
      )
    )
  return modes


def recorded_results(path: str = SYNTHETIC_RESULTS) -> dict:
  """What reproduce_synthetic.py measured for the shipped models (see module docstring)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; {_REBUILD}")
  with open(path) as f:
    return json.load(f)
