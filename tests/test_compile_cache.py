"""The persistent compilation cache: a second process loads what the first compiled."""

import json
import os
import subprocess
import sys
import textwrap

from psynth_jax import compile_cache

SCRIPT = textwrap.dedent(
  """
  import json
  import jax, jax.numpy as jnp
  from psynth_jax import compile_cache
  path = compile_cache.enable()
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache tiny programs too
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))
  f(jnp.ones((32, 32))).block_until_ready()
  print(json.dumps({"path": path, **compile_cache.counts()}))
  """
)


def _run(env):
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_its_programs_from_the_cache(tmp_path):
  env = {**os.environ, compile_cache.ENV: str(tmp_path / "xla")}
  first, second = _run(env), _run(env)
  assert first["path"] == str(tmp_path / "xla") and os.listdir(first["path"])
  assert first["compiled"] >= 1 and first["from_cache"] == 0
  assert second["compiled"] == 0 and second["from_cache"] == first["compiled"]


def test_off_leaves_the_cache_off(tmp_path):
  off = _run({**os.environ, compile_cache.ENV: "off"})
  assert off["path"] is None and off["from_cache"] == 0 and off["compiled"] >= 1
