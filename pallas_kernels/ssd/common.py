"""Block sizes of the SSD kernels."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """chunk: positions per grid step (the SSD chunk Q; a multiple of 8 on TPU).

  128 keeps the [Q, Q] decay matrix and the [Q, head_dim] / [Q, d_state] tiles within a
  TPU core's VMEM with double buffering at head_dim 64 and d_state 128, and fills the
  128-wide MXU of v5e (256-wide on v6e: 256 is worth trying there).
  """
  chunk: int = 128

  def __post_init__(self):
    if self.chunk < 8 or self.chunk % 8:
      raise ValueError(f"BlockSizes.chunk={self.chunk} must be a positive multiple of 8")
