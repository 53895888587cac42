"""RMSNorm (optionally gated) followed by a matrix-vector product, one Pallas Triton kernel.

Decoding runs one token per row, so every projection is a matrix-vector product that reads
its weight once: a few MiB in a few microseconds, where the time goes to memory latency
rather than bandwidth. XLA turns such a small dot into a multiply and a reduction and, when
the multiply fuses with the norm before it, writes the whole [k, n] product to memory and
reads it back; the norm's statistics add kernels more. Here one kernel does all of it:

  grid (row blocks, column blocks of block_n). A program loads its whole [k, block_n] slice
  of the weight, the rows' x (and gate) and the norm weight, all at once: the k chunks are
  unrolled in Python, so no load waits on another and every one of them is in flight
  together. It then sums each row's squares per group of channels, normalises, and
  accumulates x_n[:, None] * w chunk by chunk into one [block_k, block_n] tile that is
  reduced over k once at the end.

Measured on an H100 (docs/kernels/decode.md) this is what made the kernel faster than XLA:
a k loop whose x loads waited on memory each iteration cost about 1 µs a chunk, and a
tensor-core form (rows padded to 16) kept that wait. The default block_n keeps a program's
weight slice near 48 KiB, which stays in registers at 4 warps.

Rows are few (a decode batch): up to MAX_ROWS share a program and its weight loads; the
normalised row is rounded to the compute dtype before the product, as an nnx.Linear of that
dtype would.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_F32 = jnp.float32
MAX_ROWS = 8                      # rows per program; more rows take more programs
_SLICE_ELEMENTS = 24 * 1024       # weight elements per program for the default block_n


def _kernel(*refs, k, n, rows, block_k, block_n, eps, group_size, gated, has_residual, dtype):
  x_ref, *refs = refs
  g_ref = refs.pop(0) if gated else None
  nw_ref, w_ref, *refs = refs
  r_ref = refs.pop(0) if has_residual else None
  (o_ref,) = refs
  row0 = pl.program_id(0) * rows
  col0 = pl.program_id(1) * block_n
  col_ok = col0 + jnp.arange(block_n) < n
  # Unrolled: every load is issued up front. jnp scalars, not ints: the last chunk may
  # overhang k (masked), which a static slice would refuse.
  starts = [jnp.int32(start) for start in range(0, k, block_k)]
  channels = [start + jnp.arange(block_k) for start in starts]
  groups = k // group_size
  in_group = [[(ks >= g * group_size) & (ks < (g + 1) * group_size) for g in range(groups)]
              for ks in channels]

  ws = [plgpu.load(w_ref.at[pl.ds(start, block_k), pl.ds(col0, block_n)],
                   mask=(ks < k)[:, None] & col_ok[None, :], other=0.0)
        for start, ks in zip(starts, channels)]
  nws = [plgpu.load(nw_ref.at[pl.ds(start, block_k)], mask=ks < k, other=0.0).astype(_F32)
         for start, ks in zip(starts, channels)]

  def row_chunks(r):
    """Row row0 + r (gated), fp32, one [block_k] piece per chunk, zero outside."""
    pieces = []
    for start, ks in zip(starts, channels):
      ok = (ks < k) & (row0 + r < x_ref.shape[0])
      u = plgpu.load(x_ref.at[row0 + r, pl.ds(start, block_k)], mask=ok, other=0.0)
      u = u.astype(_F32)
      if gated:
        z = plgpu.load(g_ref.at[row0 + r, pl.ds(start, block_k)], mask=ok, other=0.0)
        z = z.astype(_F32)
        u = u * z * jax.nn.sigmoid(z)
      pieces.append(u)
    return pieces

  xs = [row_chunks(r) for r in range(rows)]
  ws = [w.astype(dtype).astype(_F32) for w in ws]
  for r in range(rows):
    sums = [sum(jnp.sum(jnp.where(in_group[c][g], u * u, 0.0)) for c, u in enumerate(xs[r]))
            for g in range(groups)]
    inv_rms = [jax.lax.rsqrt(s / group_size + eps) for s in sums]
    acc = jnp.zeros((block_k, block_n), _F32)
    for c, u in enumerate(xs[r]):
      scale = inv_rms[0] if groups == 1 else sum(
          jnp.where(m, inv, 0.0) for m, inv in zip(in_group[c], inv_rms))
      xn = (u * scale * nws[c]).astype(dtype).astype(_F32)
      acc = acc + xn[:, None] * ws[c]
    ok = col_ok & (row0 + r < o_ref.shape[0])
    out = jnp.sum(acc, axis=0).astype(dtype)
    if has_residual:
      res = plgpu.load(r_ref.at[row0 + r, pl.ds(col0, block_n)], mask=ok, other=0.0)
      out = res.astype(_F32) + out.astype(_F32)
    plgpu.store(o_ref.at[row0 + r, pl.ds(col0, block_n)], out.astype(o_ref.dtype), mask=ok)


def default_block_n(k: int) -> int:
  """The widest power-of-two column block (16 .. 64) whose [k, block_n] weight slice stays
  near _SLICE_ELEMENTS: 32 for the 190M in-projection (k 768), 16 for its out-projection."""
  block_n = 64
  while block_n > 16 and k * block_n > _SLICE_ELEMENTS:
    block_n //= 2
  return block_n


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "group_size", "block_k", "block_n",
                                             "num_warps", "interpret"))
def norm_matvec_gpu(x, norm_weight, w, *, eps: float, dtype, gate=None,
                    group_size: int | None = None, residual=None, block_k: int = 256,
                    block_n: int | None = None, num_warps: int = 4, interpret: bool = False):
  """(residual +) RMSNorm(x [* silu(gate)]) @ w; see reference.norm_matvec_reference.

  x: [b, k]; gate: [b, >= k] (its first k columns are used, so a slice of a wider
  projection need not be copied out); norm_weight: [k]; w: [k, n] (any float dtype; rounded
  to `dtype` as loaded); residual: [b, n]. block_k and block_n: powers of two (block_n
  default: default_block_n(k)).
  """
  b, k = x.shape
  n = w.shape[1]
  if gate is not None and (gate.shape[0] != b or gate.shape[1] < k):
    raise ValueError(f"gate {gate.shape} must be [{b}, >= {k}]")
  group_size = group_size or k
  if k % group_size:
    raise ValueError(f"group_size={group_size} does not divide the {k} channels")
  if w.shape[0] != k or norm_weight.shape != (k,):
    raise ValueError(f"x {x.shape}, norm_weight {norm_weight.shape} and w {w.shape} disagree "
                     "on the channel count")
  block_n = block_n or default_block_n(k)
  for name, v in (("block_k", block_k), ("block_n", block_n)):
    if v & (v - 1):
      raise ValueError(f"{name}={v} must be a power of two (a Triton block)")
  rows = min(b, MAX_ROWS)
  dtype = jnp.dtype(dtype)
  out_dtype = _F32 if residual is not None else dtype
  kernel = functools.partial(
      _kernel, k=k, n=n, rows=rows, block_k=block_k, block_n=block_n, eps=eps,
      group_size=group_size, gated=gate is not None, has_residual=residual is not None,
      dtype=dtype)
  operands = [x] + ([gate] if gate is not None else []) + [norm_weight, w]
  operands += [residual] if residual is not None else []
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((b, n), out_dtype),
      grid=(pl.cdiv(b, rows), pl.cdiv(n, block_n)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="norm_matvec")(*operands)
