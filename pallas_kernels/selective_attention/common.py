"""What the GPU and TPU selective attention kernels share: block sizes, the compaction of
selected rows into slots, the running count that bounds each key block's loop, row gathers and
scatters, and the custom_vjp around a backend's forward and backward."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels.custom_vjp import kernel_vjp

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tile:
  """One kernel's tile: block_q compacted query rows by block_k keys per step, and its
  Triton launch parameters (the TPU kernels ignore those)."""
  block_q: int = 64
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """A tile for each kernel: forward, dq and dk/dv.

  Defaults from the H100 sweeps in docs/kernels/selective_attention.md: 64 x 64 tiles, 4 warps
  and 3 pipeline stages for all three.
  """
  forward: Tile = Tile(64, 64, 4, 3)
  dq: Tile = Tile(64, 64, 4, 3)
  dkv: Tile = Tile(64, 64, 4, 3)

  @classmethod
  def uniform(cls, block_q: int, block_k: int, **launch) -> "BlockSizes":
    """The same block_q x block_k tile for all three kernels (the TPU kernels need this);
    launch: num_warps, num_stages."""
    tile = Tile(block_q, block_k, **launch)
    return cls(tile, tile, tile)

  @classmethod
  def for_backend(cls, backend: str) -> "BlockSizes":
    """The defaults of a backend's kernels: the H100-tuned tiles on a GPU; on a TPU one
    128 x 128 tile for all three kernels (the Mosaic kernels need one tile, and 128 fills the
    MXU)."""
    return cls() if backend == "gpu" else cls.uniform(128, 128)

  @property
  def slot_multiple(self) -> int:
    """Slots are padded to a multiple of every kernel's block_q."""
    return math.lcm(self.forward.block_q, self.dq.block_q, self.dkv.block_q)


def compact_selection(select, window: int, block_q: int):
  """(pos, count). pos [batch, slots] int32: the positions of the selected rows, ascending,
  then the sentinel seq + window (a row that sees no key), padded to a multiple of block_q.
  count [batch, seq] int32: the selected rows at or before each position (a running count;
  slot_blocks_seeing_key_blocks reads its ranges from it).

  The running count gives each selected row its slot, so this is one cumsum and one scatter
  (a sort of the whole row costs several times more on a GPU)."""
  b, l = select.shape
  sel = select.astype(bool)
  slots = l + (-l) % block_q
  count = jnp.cumsum(sel, axis=1, dtype=jnp.int32)
  slot = jnp.where(sel, count - 1, slots)
  pos = jnp.full((b, slots), l + window, jnp.int32)
  pos = pos.at[jnp.arange(b)[:, None], slot].set(
      jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)), mode="drop")
  return pos, count


def slot_blocks_seeing_key_blocks(count, num_key_blocks, window, block_q, block_k):
  """[batch, key blocks, 2] int32: the slot blocks [lo, hi) holding rows that can see each key
  block, i.e. whose positions lie in [kb * block_k, kb * block_k + block_k - 1 + window).
  Every block in the range holds a selected row.

  Slots hold the selected rows in order, so the slots below position x number the selected
  rows before x: a read of the running count, where a search of pos (even a merge by sort)
  cost the H100 ~150 us per backward pass."""
  l = count.shape[1]
  before = lambda x: jnp.where(x > 0, count[:, jnp.clip(x, 1, l) - 1], 0)
  starts = jnp.arange(num_key_blocks, dtype=jnp.int32) * block_k
  first, end = before(starts), before(starts + block_k - 1 + window)
  lo = first // block_q
  hi = jnp.where(end > first, (end - 1) // block_q + 1, lo)
  return jnp.stack([lo, hi], axis=-1).astype(jnp.int32)


def gather_rows(t, pos):
  """t: [batch, seq, ...] -> [batch, slots, ...], the rows at pos (sentinels read row
  seq - 1, a row nothing uses)."""
  at = jnp.clip(pos, 0, t.shape[1] - 1)
  return jnp.take_along_axis(t, at.reshape(at.shape + (1,) * (t.ndim - 2)), axis=1)


def scatter_rows(t_c, pos, seq_len):
  """t_c: [batch, slots, ...] -> [batch, seq, ...], row s written at pos[:, s] and zeros
  elsewhere. Positions are distinct and sentinels fall outside, so this is a plain set: an
  add (what autodiff would make of gather_rows) piles every sentinel onto one row."""
  b = t_c.shape[0]
  out = jnp.zeros((b, seq_len) + t_c.shape[2:], t_c.dtype)
  return out.at[jnp.arange(b)[:, None], pos].set(t_c, mode="drop")


@dataclasses.dataclass(frozen=True)
class Statics:
  """What the kernels are specialised on. window_only: there is no kv_select and one
  segment, so the causal window is the whole mask (the GPU kernels then read neither)."""
  window: int
  window_only: bool
  block_sizes: BlockSizes
  interpret: object


def make_selective_attention(forward, backward):
  """The public op from a backend's kernels, which read and write rows at original positions.

  forward(q, k, v, pos, count, ok, seg, statics) -> (o, lse): o [b, seq, h, d] with zeros at
    unselected rows, lse [b, h, slots] fp32 (+inf for rows that see no key);
  backward(q, k, v, pos, count, ok, seg, o, lse, do, statics) -> (dq, dk, dv).
  pos and count are compact_selection's; ok and seg are [b, seq] int32.
  """
  def attend_fwd(statics, *arrays):
    o, lse = forward(*arrays, statics)
    return o, (o, lse)

  def attend_bwd(statics, arrays, saved, do):
    return backward(*arrays, *saved, do.astype(arrays[0].dtype), statics)

  # arrays: q, k, v | pos, count, ok, seg.
  attend = kernel_vjp(attend_fwd, attend_bwd, differentiable=3)

  def run(q, k, v, select, *, window, kv_select, segment_ids, block_sizes, interpret):
    b, l = q.shape[:2]
    if window < 1:
      raise ValueError(f"window must be >= 1, got {window}")
    pos, count = compact_selection(select, window, block_sizes.slot_multiple)
    seg = (jnp.zeros((b, l), jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
    ok = jnp.ones((b, l), jnp.int32) if kv_select is None else kv_select.astype(jnp.int32)
    window_only = kv_select is None and segment_ids is None
    statics = Statics(window, window_only, block_sizes, interpret)
    return attend(statics, q, k, v, pos, count, ok, seg)

  return run
