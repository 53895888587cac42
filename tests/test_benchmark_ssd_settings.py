"""benchmarks/ssd_settings.py: GPU SSD BlockSizes from a command-line string, and the switch
that makes the models' ops.ssd use them."""
import os
import sys

import pytest

from pallas_kernels.ssd import BlockSizes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import ssd_settings  # noqa: E402


def test_fields_parse_over_the_gpu_defaults():
  bs = ssd_settings.parse_block_sizes("chunk_bwd=128,chunk_grad=32,two_level=None,"
                                      "num_warps_bwd=8")
  defaults = BlockSizes.for_backend("gpu")
  assert (bs.chunk_bwd, bs.chunk_grad, bs.two_level, bs.num_warps_bwd) == (128, 32, None, 8)
  assert (bs.chunk, bs.num_stages_bwd) == (defaults.chunk, defaults.num_stages_bwd)
  assert ssd_settings.parse_block_sizes("") == defaults
  with pytest.raises(ValueError, match="chunk_grad=48"):
    ssd_settings.parse_block_sizes("chunk_bwd=128,chunk_grad=48")


def test_use_on_gpu_changes_only_the_gpu_defaults(monkeypatch):
  monkeypatch.setattr(BlockSizes, "for_backend", BlockSizes.for_backend)   # undone after
  tpu = BlockSizes.for_backend("tpu")
  chosen = ssd_settings.parse_block_sizes("chunk_bwd=64,chunk_grad=16")
  ssd_settings.use_on_gpu(chosen)
  assert BlockSizes.for_backend("gpu") is chosen
  assert BlockSizes.for_backend("tpu") == tpu
