"""Shared test setup: float64 on the host for references, a fresh seed per test."""
import os

# Tests run on the CPU unless a caller picked a platform; 8 simulated devices for the
# sharding tests (set before jax initialises its backends).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache for the run's workers, the subprocesses the CLI tests
# start and the notebook kernels: they compile the same tiny models many times over.
# (notebooks/conftest.py names the same folder, for a run of the notebooks alone.)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  """A numpy Generator seeded from the test's name: fresh inputs per test, reproducible."""
  # crc32, not hash(): str hashes are salted per process, which made seeds differ per run.
  seed = zlib.crc32(request.node.nodeid.encode())
  return np.random.default_rng(seed)
