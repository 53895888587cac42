"""pytest --nbmake runs the notebooks in small mode, their figures into a temporary folder
(the kernels inherit this environment)."""
import os
import tempfile

os.environ["TAIPAN_NOTEBOOK_SMALL"] = "1"
os.environ.setdefault("TAIPAN_NOTEBOOK_IMAGES", tempfile.mkdtemp(prefix="taipan_nb_images_"))
# The compilation cache tests/conftest.py sets up, for a run of the notebooks alone.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# As in tests/conftest.py: on the CPU, compile for compile time (LLVM's optimizations and
# XLA:CPU's fusion emitters off); the small-mode runs are short.
if (os.environ.get("JAX_PLATFORMS") == "cpu"
    and os.environ.get("TAIPAN_TESTS_OPTIMIZE", "0") != "1"):
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  if "--xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_use_fusion_emitters=false").strip()
