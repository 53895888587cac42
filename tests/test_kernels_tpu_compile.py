"""Every Pallas TPU kernel compiles with Mosaic, forward and backward, for two TPU generations
at two shapes, inside shard_map over a 4-chip topology. No TPU is needed: libtpu describes the
slice and compiles for it (benchmarks/tpu_kernel_compile.py runs the full matrix)."""
import os
import sys

import pytest

from taipan_jax.sharding.topology import libtpu_available

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import tpu_kernel_compile  # noqa: E402

pytestmark = pytest.mark.skipif(
    not libtpu_available(), reason="libtpu not installed: `pip install -e '.[test]'` on Linux "
    "x86_64 (or '.[tpu]') brings it and these run")

# Forward, plus the backward's kernels: SSD recomputes the chunk states (a second forward
# kernel), then their gradients and every input's; attention runs dq and dk/dv.
MOSAIC_CALLS = {"ssd": 4, "selective_attention": 3}


@pytest.mark.parametrize("shape", ["small", "odd"])
@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize("kernel", sorted(MOSAIC_CALLS))
def test_kernel_compiles_for_tpu(kernel, generation, shape):
  seconds, mosaic = tpu_kernel_compile.compile_kernel(
      kernel, tpu_kernel_compile.GENERATION_TOPOLOGY[generation],
      tpu_kernel_compile.SHAPES[shape])
  print(f"{kernel} {generation} {shape}: {seconds:.1f} s")
  assert mosaic == MOSAIC_CALLS[kernel]


def test_a_chunk_mosaic_cannot_tile_is_refused_before_compiling():
  import dataclasses
  shape = dataclasses.replace(tpu_kernel_compile.SHAPES["small"], chunk=64)
  with pytest.raises(ValueError, match="chunk=64: on a TPU the Mosaic kernel needs a multiple"):
    tpu_kernel_compile.compile_kernel("ssd", "v5e:2x2", shape)
