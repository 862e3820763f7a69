"""Training SmolLM2-135M-Instruct's mapper and LoRA: the fast real model (CPU arms, ablations).

The model is the converted folder ~/.cache/psynth_jax/models/smollm2-135m-instruct
(`psynth weights smollm2-135m`). It runs the real-data stages of
psynth_jax/configs/stages.py, with every arm:

  python experiments/build_stage1.py --limit 200 --out runs/smollm2/stage1 \
    --budget psynth_jax/configs/smollm2_135m.py:stage1
  python experiments/train.py --config psynth_jax/configs/smollm2_135m.py:stage1,lora_only \
    --workdir runs/train/smollm2/stage1_lora_only
"""

from ml_collections import ConfigDict

from psynth_jax.configs import stages
from psynth_jax.configs.base import default_config

MODEL = "~/.cache/psynth_jax/models/smollm2-135m-instruct"


def get_config(arg: str = "stage1") -> ConfigDict:
  c = default_config()
  c.model.path = MODEL
  return stages.apply(c, arg, "smollm2")
