"""RMSNorm (optionally gated) followed by a matrix-vector product, one Pallas Triton kernel.

Decoding runs one token per row, so every projection is a matrix-vector product that reads
its weight once. XLA turns such a small dot into a multiply and a reduction and, when the
multiply fuses with the norm before it, writes the whole [k, n] product to memory and reads
it back; the norm's statistics add two kernels more. Here one kernel does all of it:

  grid (row blocks, column blocks of block_n). Each program first sums the squares of its rows
  (the gated product x * silu(gate) when gated) per group of channels, then walks k in chunks
  of block_k: the weight chunk [block_k, block_n] is loaded once and used for every row.

The k loops are real loops so Triton pipelines the weight loads over num_stages. Rows are
few (a decode batch), so each is its own static body inside them; the normalised row is
rounded to the compute dtype before the product, as an nnx.Linear of that dtype would.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_F32 = jnp.float32
MAX_ROWS = 8      # rows per program; more rows take more programs


def _kernel(*refs, k, n, rows, block_k, block_n, eps, group_size, gated, has_residual, dtype):
  x_ref, *refs = refs
  g_ref = refs.pop(0) if gated else None
  nw_ref, w_ref, *refs = refs
  r_ref = refs.pop(0) if has_residual else None
  (o_ref,) = refs
  row0 = pl.program_id(0) * rows
  col0 = pl.program_id(1) * block_n
  col_ok = col0 + jnp.arange(block_n) < n
  chunks = pl.cdiv(k, block_k)
  groups = k // group_size

  def row_chunk(r, start):
    """x (gated) of row row0 + r over channels start .. start + block_k, fp32, zero outside."""
    ks = start + jnp.arange(block_k)
    ok = (ks < k) & (row0 + r < x_ref.shape[0])
    u = plgpu.load(x_ref.at[row0 + r, pl.ds(start, block_k)], mask=ok, other=0.0).astype(_F32)
    if gated:
      z = plgpu.load(g_ref.at[row0 + r, pl.ds(start, block_k)], mask=ok, other=0.0)
      z = z.astype(_F32)
      u = u * z * jax.nn.sigmoid(z)
    return ks, u

  def group_masks(ks):
    return [(ks >= g * group_size) & (ks < (g + 1) * group_size) for g in range(groups)]

  # Pass 1: per row, the sum of squares of each group of channels.
  def stats(c, sums):
    sums = list(sums)
    for r in range(rows):
      ks, u = row_chunk(r, c * block_k)
      for g, in_group in enumerate(group_masks(ks)):
        sums[r * groups + g] = sums[r * groups + g] + jnp.sum(jnp.where(in_group, u * u, 0.0))
    return tuple(sums)

  sums = jax.lax.fori_loop(0, chunks, stats, (jnp.zeros((), _F32),) * (rows * groups))
  inv_rms = [jax.lax.rsqrt(s / group_size + eps) for s in sums]

  # Pass 2: the product, one weight chunk at a time, shared by the rows. A loop (not unrolled)
  # so that Triton pipelines the weight loads over num_stages.
  def product(c, acc):
    start = c * block_k
    ks = start + jnp.arange(block_k)
    w = plgpu.load(w_ref.at[pl.ds(start, block_k), pl.ds(col0, block_n)],
                   mask=(ks < k)[:, None] & col_ok[None, :], other=0.0)
    w = w.astype(dtype).astype(_F32)
    nw = plgpu.load(nw_ref.at[pl.ds(start, block_k)], mask=ks < k, other=0.0).astype(_F32)
    masks = group_masks(ks)
    acc = list(acc)
    for r in range(rows):
      _, u = row_chunk(r, start)
      scale = inv_rms[r * groups] if groups == 1 else sum(
          jnp.where(m, inv_rms[r * groups + g], 0.0) for g, m in enumerate(masks))
      xn = (u * scale * nw).astype(dtype).astype(_F32)
      acc[r] = acc[r] + jnp.sum(xn[:, None] * w, axis=0)
    return tuple(acc)

  acc = jax.lax.fori_loop(0, chunks, product, (jnp.zeros((block_n,), _F32),) * rows)

  for r in range(rows):
    ok = col_ok & (row0 + r < o_ref.shape[0])
    out = acc[r].astype(dtype)
    if has_residual:
      res = plgpu.load(r_ref.at[row0 + r, pl.ds(col0, block_n)], mask=ok, other=0.0)
      out = res.astype(_F32) + out.astype(_F32)
    plgpu.store(o_ref.at[row0 + r, pl.ds(col0, block_n)], out.astype(o_ref.dtype), mask=ok)


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "group_size", "block_k", "block_n",
                                             "num_warps", "num_stages", "interpret"))
def norm_matvec_gpu(x, norm_weight, w, *, eps: float, dtype, gate=None,
                    group_size: int | None = None, residual=None, block_k: int = 256,
                    block_n: int = 32, num_warps: int = 4, num_stages: int = 3,
                    interpret: bool = False):
  """(residual +) RMSNorm(x [* silu(gate)]) @ w; see reference.norm_matvec_reference.

  x: [b, k]; gate: [b, >= k] (its first k columns are used, so a slice of a wider
  projection need not be copied out); norm_weight: [k]; w: [k, n] (any float dtype; rounded
  to `dtype` as loaded); residual: [b, n]. block_k and block_n: powers of two.
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
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="norm_matvec")(*operands)
