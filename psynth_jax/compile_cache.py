"""The persistent XLA compilation cache, and a count of what a run compiles.

The CLI and the benchmarks turn the cache on (`enable()`): a second `psynth eval` of
the same model and budgets loads its programs from disk instead of compiling them
again (minutes on a 2-core CPU for a 0.5B model). The folder is `xla/` under the
psynth cache (`$PSYNTH_CACHE`, default `~/.cache/psynth_jax`), or
`$PSYNTH_JAX_COMPILATION_CACHE`; setting that variable to "off" leaves the cache off. The cache is keyed by jax itself on the program, the
jax/jaxlib version, the backend and the XLA flags, so a stale entry is never used.

`counts()` reads what this process compiled so far: programs XLA compiled, programs
loaded from the cache, and the seconds spent in XLA compilation.
"""

from __future__ import annotations

import os
import threading

import jax
import jax.monitoring

ENV = "PSYNTH_JAX_COMPILATION_CACHE"

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_counts = {"programs": 0, "from_cache": 0, "compile_s": 0.0}
_listening = False


def enable(path: str | None = None) -> str | None:
  """Turns the persistent cache on (idempotent); returns its folder, or None if "off"."""
  listen()
  from psynth_jax.convert.weights import cache_root

  path = path or os.environ.get(ENV) or str(cache_root() / "xla")
  if path.lower() == "off":
    return None
  path = os.path.expanduser(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # Cache every program that took XLA 0.1 s or more (jax's default, 1 s, left 98 of the
  # demo's 125 programs to compile again on every run), whatever its size.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def listen() -> None:
  """Starts counting compilations (idempotent; `enable` calls it)."""
  global _listening
  with _lock:
    if _listening:
      return
    _listening = True
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  jax.monitoring.register_event_listener(_on_event)


def _on_duration(name: str, seconds: float, **_) -> None:
  if name == _BACKEND_COMPILE:  # recorded for a compilation and for a cache load alike
    with _lock:
      _counts["programs"] += 1
      _counts["compile_s"] += seconds


def _on_event(name: str, **_) -> None:
  if name == _CACHE_HIT:
    with _lock:
      _counts["from_cache"] += 1


def counts() -> dict[str, float]:
  """{programs, compiled, from_cache, compile_s} since `listen()`: programs = compiled +
  loaded from the cache; compile_s includes the loads."""
  with _lock:
    out = dict(_counts)
  out["compiled"] = out["programs"] - out["from_cache"]
  return out


def describe(since: dict[str, float] | None = None) -> str:
  """One line: what was compiled (since an earlier `counts()`, if given)."""
  now = counts()
  if since:
    now = {k: now[k] - since.get(k, 0) for k in now}
  where = jax.config.jax_compilation_cache_dir or "off"
  return (
    f"XLA programs: {int(now['compiled'])} compiled, {int(now['from_cache'])} loaded from"
    f" the persistent cache ({where}), {now['compile_s']:.1f}s in all"
  )
