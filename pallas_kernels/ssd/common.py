"""Block sizes of the SSD kernels, with defaults per backend."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the SSD kernels. The result does not depend on it beyond rounding.

  chunk: positions per step of the forward kernel (the SSD chunk Q).
  chunk_bwd: positions per step of the backward's state passes; the state entering every
    such chunk and its gradient are written to memory once, so it is kept >= d_state.
  chunk_grad: positions per program of the GPU chunk-gradient kernel (None = chunk_bwd), a
    divisor of chunk_bwd: [Q, Q] tiles live in registers there, so it reads the states at
    chunk_bwd and carries them over the sub-chunks itself.
  two_level: GPU forward and state passes chunk-parallel (per-chunk states, then a light
    sequential pass over them) rather than one sequential program per (batch, head, head_dim
    block); None = when batch * heads is below gpu_two_level.TWO_LEVEL_BELOW.
  block_p: head_dim rows of the state per program (GPU; None = all, split further only when
    batch * heads is too small to fill the GPU). Rows of the state never mix, so splitting
    head_dim only adds programs (and recomputes C B^T per split).
  heads_per_program: heads of a group per program of the backward's chunk kernel (GPU; None =
    all). It sums dB and dC over its heads in registers; fewer heads per program mean more
    programs and fp32 partial sums to add up after.
  num_warps, num_stages, num_warps_bwd, num_stages_bwd: Triton launch parameters (GPU; the
    _bwd ones for the backward's kernels, num_warps_bwd None = num_warps).

  TPU: chunk 128 keeps the [Q, Q] decay matrix and the [Q, head_dim] / [Q, d_state] tiles in
  VMEM with double buffering at head_dim 64 and d_state 128, and fills the 128-wide MXU.
  GPU: see for_backend; the [Q, Q] tiles live in registers, so Q is smaller there.
  """
  chunk: int = 128
  chunk_bwd: int = 128
  chunk_grad: int | None = None
  two_level: bool | None = False
  block_p: int | None = None
  heads_per_program: int | None = None
  num_warps: int = 4
  num_stages: int = 2
  num_warps_bwd: int | None = None
  num_stages_bwd: int = 2

  def __post_init__(self):
    for name in ("chunk", "chunk_bwd"):
      v = getattr(self, name)
      if v < 8 or v % 8:
        raise ValueError(f"BlockSizes.{name}={v} must be a positive multiple of 8")
    if self.chunk_grad is not None and (self.chunk_grad < 8 or self.chunk_grad % 8
                                        or self.chunk_bwd % self.chunk_grad):
      raise ValueError(f"BlockSizes.chunk_grad={self.chunk_grad} must be a multiple of 8 "
                       f"that divides chunk_bwd={self.chunk_bwd}")

  @classmethod
  def for_backend(cls, backend: str) -> "BlockSizes":
    """The defaults of a backend's kernels ('gpu' or 'tpu')."""
    if backend == "gpu":      # tuned on an H100 by benchmarks/ssd_tune.py
      # chunk_grad and two_level stay off: those kernels have not yet been timed on a GPU
      # (docs/kernels/ssd.md says how to measure them and set these fields).
      return cls(chunk=64, chunk_bwd=32, chunk_grad=None, two_level=False, block_p=None,
                 heads_per_program=None, num_warps=4, num_stages=2, num_stages_bwd=1)
    return cls()
