"""Shared test setup: float32 at full matmul precision, 8 emulated CPU devices, --runslow."""

import gc
import os

# Must happen before jax is imported anywhere: the sharding tests need 8 devices.
# Backend optimisation level 0 roughly halves XLA CPU compile time, which
# dominates this suite; numerics are unchanged (float32, highest precision).
os.environ.setdefault(
  "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI and the benchmarks turn on the persistent compilation cache; tests that call
# them must not fill ~/.cache with test programs (tests/test_compile_cache.py tests it).
os.environ.setdefault("PSYNTH_JAX_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: pass --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops jax's compiled programs after each test module. One process runs the whole
  suite; without this its executables accumulate until XLA:CPU crashed compiling
  (a segfault in backend_compile at ~525 tests, not reproducible per module)."""
  yield
  jax.clear_caches()
  gc.collect()
