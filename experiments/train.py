r"""Trains the Parallel-Synthesis cache mapper and synthesizer LoRA from a config.

  python experiments/train.py --config psynth_jax/configs/synthetic.py:tiny --workdir /tmp/psynth/tiny
  python experiments/train.py --config psynth_jax/configs/qwen2_5_coder_0_5b.py --workdir /tmp/psynth/qwen05 \
    --config.data.train_jsonl=/tmp/psynth/traces/train.jsonl

Running it again with the same workdir resumes from the newest checkpoint. SIGTERM
(`kill PID`) stops it after the step in flight with a checkpoint there; it then exits
with status 143 (128 + SIGTERM), so a script running arms one after another stops too.
Any config field can be overridden (`--config.train.trainable=lora_only`).
"""

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from psynth_jax import compile_cache
from psynth_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "psynth_jax/configs/NAME.py[:arg]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics and exports go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO; the bar says enough
  compile_cache.enable()  # a resumed run (or another arm's) loads the programs it met
  result = trainer.train(_CONFIG.value, _WORKDIR.value)
  last = result.history[-1] if result.history else {}
  print(
    f"step {result.step}  loss {last.get('loss')}  skipped {last.get('skipped_total')}  "
    f"export {result.export_dir}"
  )
  if result.interrupted:
    sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
  app.run(main)
