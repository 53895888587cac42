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


# The longest tests (30 s to 2 min each on the 2-core CI machine), longest first. Moved to the
# front, both pytest-xdist workers start on them and short tests fill the end; in collection
# order one of them could run alone at the end while the other worker sits idle.
_LONGEST_FIRST = (
    "test_tiny_taipan_learns_mqar", "test_checkpoint_moves_between_meshes",
    "test_training_is_the_same_on_every_mesh", "test_two_processes_train_like_one",
    "test_training_with_the_length_split_equals_one_device", "02_long_context.ipynb",
    "04_compare_architectures.ipynb", "01_quickstart.ipynb",
    "test_lm_eval_adapter_equals_a_direct_computation",
    "test_kill_and_resume_matches_an_uninterrupted_run_bitwise",
    "test_upcycled_taipan_starts_equal_to_its_mamba2",
    "test_corrupt_latest_checkpoint_falls_back_to_the_previous",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(getattr(item, "originalname", None) or item.name,
                                       len(rank)))
