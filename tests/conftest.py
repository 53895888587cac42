"""Shared test setup: float64 on the host for references, a fresh seed per test."""
import os

# Tests run on the CPU unless a caller picked a platform; 8 simulated devices for the
# sharding tests (set before jax initialises its backends).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
  """A numpy Generator seeded from the test's name: fresh inputs per test, reproducible."""
  # crc32, not hash(): str hashes are salted per process, which made seeds differ per run.
  seed = zlib.crc32(request.node.nodeid.encode())
  return np.random.default_rng(seed)
