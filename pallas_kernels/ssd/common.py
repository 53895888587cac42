"""Block sizes of the SSD kernels, with defaults per backend."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the SSD kernels. The result does not depend on it beyond rounding.

  chunk: positions per step of the forward kernel (the SSD chunk Q).
  chunk_bwd: positions per step of the backward kernels; the state entering every such
    chunk is written to memory once, so it is kept >= d_state where registers allow.
  block_p: head_dim rows of the state per program (GPU; None = all, split further only when
    batch * heads is too small to fill the GPU). Rows of the state never mix, so splitting
    head_dim only adds programs (and recomputes C B^T per split).
  heads_per_program: heads of a group per program of the backward's chunk kernel (GPU; None =
    all). It sums dB and dC over its heads in registers; fewer heads per program mean more
    programs and fp32 partial sums to add up after.
  num_warps, num_stages, num_stages_bwd: Triton launch parameters (GPU; the last for the
    three backward kernels).

  TPU: chunk 128 keeps the [Q, Q] decay matrix and the [Q, head_dim] / [Q, d_state] tiles in
  VMEM with double buffering at head_dim 64 and d_state 128, and fills the 128-wide MXU.
  GPU: see for_backend; the [Q, Q] tiles live in registers, so Q is smaller there.
  """
  chunk: int = 128
  chunk_bwd: int = 128
  block_p: int | None = None
  heads_per_program: int | None = None
  num_warps: int = 4
  num_stages: int = 2
  num_stages_bwd: int = 2

  def __post_init__(self):
    for name in ("chunk", "chunk_bwd"):
      v = getattr(self, name)
      if v < 8 or v % 8:
        raise ValueError(f"BlockSizes.{name}={v} must be a positive multiple of 8")

  @classmethod
  def for_backend(cls, backend: str) -> "BlockSizes":
    """The defaults of a backend's kernels ('gpu' or 'tpu')."""
    if backend == "gpu":      # tuned on an H100 by benchmarks/ssd_tune.py
      return cls(chunk=64, chunk_bwd=32, block_p=None, heads_per_program=None, num_warps=4,
                 num_stages=2, num_stages_bwd=1)
    return cls()
