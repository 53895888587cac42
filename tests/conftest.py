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
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# On the CPU the suite's time is mostly XLA compiling hundreds of small programs that then
# run for milliseconds: compile them with LLVM's optimizations off (jax's own switch,
# JAX_DISABLE_MOST_OPTIMIZATIONS) and XLA:CPU's older loop emitters (its MLIR fusion emitters
# cost compile time that only pays off for long runs). That cuts the compile time of a train
# step about threefold; the programs compute the same operations in the same IEEE fp32, at
# a lower speed. Tests whose time is the programs' run time (a few hundred training steps,
# kernels in interpret mode on 190M-sized shapes) are marked `optimized` and compile with
# XLA's defaults (the fixture below). TAIPAN_TESTS_OPTIMIZE=1 compiles everything that way.
if (os.environ["JAX_PLATFORMS"] == "cpu"
    and os.environ.get("TAIPAN_TESTS_OPTIMIZE", "0") != "1"):
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  if "--xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

import gc
import zlib

import numpy as np
import pytest


# jax's tracing makes and drops many small Python objects: with the default threshold (700
# allocations) the cyclic collector runs thousands of times per test and walks the worker's
# whole, growing heap each time it reaches the older generations. Collecting less often cut
# the CPU time of the model and attention tests by about 7%.
gc.set_threshold(100_000, 50, 1000)


@pytest.fixture
def rng(request):
  """A numpy Generator seeded from the test's name: fresh inputs per test, reproducible."""
  # crc32, not hash(): str hashes are salted per process, which made seeds differ per run.
  seed = zlib.crc32(request.node.nodeid.encode())
  return np.random.default_rng(seed)


@pytest.fixture(autouse=True)
def _optimized_compilation(request):
  """`@pytest.mark.optimized`: the test's programs (its subprocesses' too) compile with all
  of XLA's optimizations, for tests whose time goes into running them, not compiling."""
  if (request.node.get_closest_marker("optimized") is None
      or os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") != "1"):
    yield
    return
  import jax
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", True)
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"


def pytest_configure(config):
  config.addinivalue_line("markers", "optimized: compile this test's programs with XLA's "
                          "optimizations on (it spends its time running them)")
  config.addinivalue_line("markers", "tpu_compile: compiles a whole step for a TPU slice "
                          "with libtpu (half a minute each); -m 'not tpu_compile' leaves "
                          "them out of a local run")
  # pytest-xdist's load scheduling hands each worker a first chunk of consecutive tests (a
  # quarter of its share): every test at the front of the order below went to one worker,
  # which ran them all in a row while the other worker ran the short tests. Handing out one
  # test at a time (the option's documented use: a few slow tests) lets whichever worker is
  # free take the next longest one.
  if config.pluginmanager.hasplugin("xdist") and config.getoption("maxschedchunk") is None:
    config.option.maxschedchunk = 1


# The longest tests (30 s to 1.5 min each on the 2-core CI machine), about longest first:
# moved to the front, the two pytest-xdist workers take them in turn and short tests fill the
# end; in collection order one of them could run alone at the end while the other worker sits
# idle. Tests that compile what another one compiles come after it (each worker starts on two
# tests, then takes the next free one), so that they find it in the compilation cache: the
# mesh steps of test_sharding, the 24-step CLI run of test_training_resume.
_LONGEST_FIRST = (
    "test_tiny_taipan_learns_mqar", "02_long_context.ipynb",
    "test_training_is_the_same_on_every_mesh",
    "test_kill_and_resume_matches_an_uninterrupted_run_bitwise",
    "test_training_with_the_length_split_equals_one_device", "04_compare_architectures.ipynb",
    "test_two_processes_train_like_one", "01_quickstart.ipynb",
    "test_ops_dispatch_and_mesh", "test_lm_eval_scorer_in_batches_equals_a_direct_computation",
    "test_checkpoint_moves_between_meshes",
    "test_corrupt_latest_checkpoint_falls_back_to_the_previous",
    "test_model_decode_with_the_kernels_equals_the_jnp_path",
    "test_upcycled_taipan_starts_equal_to_its_mamba2", "test_sigterm_checkpoints_and_exits_cleanly",
    "test_memory_estimate_matches_the_state_and_grows_with_tokens", "03_kernels.ipynb",
    "test_tiny_train_step_compiles_for_v5e_and_fits",
    "test_a_step_over_the_chips_memory_exits_with_one_line",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(getattr(item, "originalname", None) or item.name,
                                       len(rank)))
