"""Experiment configs (ml_collections): `base.default_config` and one file per experiment.

Pass a file to the entry points: `--config psynth_jax/configs/synthetic.py:tiny`.
"""


def load(spec: str):
  """`path.py[:arg]` -> that file's `get_config(arg)` (or `get_config()` without an arg)."""
  import importlib.util

  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("psynth_config", path)
  if module_spec is None:
    raise FileNotFoundError(f"cannot load a config from {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
