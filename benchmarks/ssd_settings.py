"""GPU SSD kernel settings from the command line: "field=value,..." over the defaults."""
from __future__ import annotations

import dataclasses

from pallas_kernels.ssd import BlockSizes

_WORDS = {"None": None, "True": True, "False": False}


def parse_block_sizes(text: str) -> BlockSizes:
  """BlockSizes.for_backend("gpu") with "field=value,..." over it (None, True, False, ints),
  e.g. "chunk_bwd=128,chunk_grad=32,two_level=None"."""
  fields = {}
  for item in filter(None, text.split(",")):
    key, _, value = item.partition("=")
    fields[key] = _WORDS[value] if value in _WORDS else int(value)
  return dataclasses.replace(BlockSizes.for_backend("gpu"), **fields)


def use_on_gpu(block_sizes: BlockSizes) -> None:
  """Makes BlockSizes.for_backend("gpu") return block_sizes in this process, so the models'
  ops.ssd (which asks it at trace time) runs the kernels at that setting."""
  original = BlockSizes.for_backend.__func__
  BlockSizes.for_backend = classmethod(
      lambda cls, backend: block_sizes if backend == "gpu" else original(cls, backend))
