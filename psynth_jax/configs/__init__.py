"""Experiment configs (ml_collections): `base.default_config` and one file per experiment.

Pass a file to the entry points: `--config psynth_jax/configs/synthetic.py:tiny`.
"""
