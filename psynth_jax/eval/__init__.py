"""Evaluation: the synthetic workflow (workers, then every synthesis mode) and the comparison report."""

from psynth_jax.eval.compare import Report, compare_modes, format_table, plot, read_json, write_json
from psynth_jax.eval.workflow import (
  NAIVE_MERGE,
  SINGLE_AGENT,
  TEXT_SYNTHESIS,
  CacheMode,
  ExampleRecord,
  accuracy,
  cache_modes,
  measure_timings,
  run_example_workers,
  run_workflow,
  ttft_by_length,
)

__all__ = [
  "NAIVE_MERGE",
  "SINGLE_AGENT",
  "TEXT_SYNTHESIS",
  "CacheMode",
  "ExampleRecord",
  "Report",
  "accuracy",
  "cache_modes",
  "compare_modes",
  "format_table",
  "measure_timings",
  "plot",
  "read_json",
  "run_example_workers",
  "run_workflow",
  "ttft_by_length",
  "write_json",
]
