"""benchmarks/ssd_registers.py: every pallas_call of the GPU SSD is captured from a CUDA
lowering on the CPU, and (where the triton package is installed) compiled for sm_90."""
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ssd import gpu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import ssd_registers  # noqa: E402

S = jax.ShapeDtypeStruct
ARGS = (S((1, 200, 2, 64), jnp.bfloat16), S((1, 200, 2), jnp.float32), S((2,), jnp.float32),
        S((1, 200, 1, 128), jnp.bfloat16), S((1, 200, 1, 128), jnp.bfloat16),
        S((1, 2, 64, 128), jnp.float32), S((1, 200), jnp.int32))


def _backward(setting):
  bs = ssd_registers.SETTINGS[setting]
  x, dt, A, B, C, init, seg = ARGS
  return ssd_registers.triton_modules(
      lambda *a: gpu.ssd_backward_gpu(*a, block_sizes=bs), (x, dt, A, B, C, init, seg, x, init))


def test_every_backward_kernel_is_captured():
  assert set(_backward("sub128_32")) == {"ssd_states", "ssd_state_grad", "ssd_chunk_grad"}
  assert set(_backward("two_level128")) == {"ssd_chunk_state", "ssd_chunk_state_grad",
                                            "ssd_state_passing", "ssd_chunk_grad"}


def test_a_captured_kernel_compiles_for_sm_90():
  pytest.importorskip("triton", reason="needs the triton package (pip install triton)")
  r = ssd_registers.resources(_backward("defaults")["ssd_state_grad"], num_warps=4,
                              num_stages=1)
  assert 0 < r["registers"] <= 255 and r["stack_bytes"] >= 0 and r["mma"] != "none"
