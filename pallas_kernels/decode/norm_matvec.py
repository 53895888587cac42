"""RMSNorm (optionally gated) followed by matrix-vector products, one Pallas Triton kernel.

Decoding runs one token per row, so every projection is a matrix-vector product that reads
its weight once: a few MiB in a few microseconds, where the time goes to memory latency
rather than bandwidth. XLA turns such a small dot into a multiply and a reduction and, when
the multiply fuses with the norm before it, writes the whole [k, n] product to memory and
reads it back; the norm's statistics add kernels more. Here one kernel does all of it:

  grid (row blocks, column blocks of block_n, k splits). A program loads its whole
  [k, block_n] slice of the weight (or its split's part of it), the rows' x (and gate) and
  the norm weight, all at once: the k chunks are unrolled in Python, so no load waits on
  another and every one of them is in flight together. It then sums each row's squares per
  group of channels, normalises, and accumulates x_n[:, None] * w chunk by chunk into one
  [block_k, block_n] tile that is reduced over k once at the end.

Several weights that share the normalised row (a layer's q, k and v; a SwiGLU's two
up-projections) take one launch: their column blocks line up along the grid's second axis.
Without a norm weight the kernel is a plain (optionally gated) product: a SwiGLU's
down-projection is w2 applied to up * silu(gate).

Measured on an H100 (docs/kernels/decode.md) this is what made the kernel faster than XLA:
a k loop whose x loads waited on memory each iteration cost about 1 µs a chunk, and a
tensor-core form (rows padded to 16) kept that wait. Below SPLIT_K_FROM channels the default
block_n keeps a program's weight slice near 48 KiB, which stays in registers at 4 warps; longer rows
(an out-projection's) are split over k, one 256-channel chunk and 64 columns a program, and
XLA adds the fp32 partial sums.

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

from pallas_kernels.decode.reference import check_norm_matvec_operands

_F32 = jnp.float32
MAX_ROWS = 8                      # rows per program; more rows take more programs
_SLICE_ELEMENTS = 24 * 1024       # weight elements per program for the default block_n
# From this many channels on, the default splits k into one block_k chunk per program, with
# 64 columns each: measured on an H100 (weights from memory) the 190M out-projection (k 1536)
# took 6.5 us against 7.2 unsplit at 16 columns, its SwiGLU down-projection (k 2048) 6.6
# against 7.8 at 8, the partial sums' XLA reduction included; at k 768 splitting was slower.
SPLIT_K_FROM = 1536


def _matvec_block(x_ref, g_ref, nw_ref, w_ref, r_ref, m_ref, o_ref, *, row0, col0, split, k,
                  n, rows, block_k, block_n, k_per_split, eps, group_size, dtype, product_dtype):
  """Rows row0 .. row0 + rows of o[:, col0:col0 + block_n], or with k split, of the partial
  product over channels split * k_per_split onward (see the module docstring). The row is
  rounded to dtype, the weight to product_dtype."""
  col_ok = col0 + jnp.arange(block_n) < n
  # Unrolled: every load is issued up front. jnp scalars, not ints: the last chunk may
  # overhang k (masked), which a static slice would refuse.
  starts = [jnp.int32(start) for start in range(0, k, block_k)]
  channels = [start + jnp.arange(block_k) for start in starts]
  groups = k // group_size
  in_group = [[(ks >= g * group_size) & (ks < (g + 1) * group_size) for g in range(groups)]
              for ks in channels]
  whole = k_per_split >= k
  if whole:
    w_starts, w_channels, w_ok = starts, channels, [ks < k for ks in channels]
  else:   # this program's channels; the norm's statistics still take the whole row
    k0 = split * k_per_split
    w_starts = [k0 + start for start in range(0, k_per_split, block_k)]
    w_channels = [start + jnp.arange(block_k) for start in w_starts]
    w_ok = [(ks < k) & (ks < k0 + k_per_split) for ks in w_channels]

  ws = [plgpu.load(w_ref.at[pl.ds(start, block_k), pl.ds(col0, block_n)],
                   mask=ok[:, None] & col_ok[None, :], other=0.0)
        for start, ok in zip(w_starts, w_ok)]
  nws = None if nw_ref is None else [
      plgpu.load(nw_ref.at[pl.ds(start, block_k)], mask=ok, other=0.0).astype(_F32)
      for start, ok in zip(w_starts, w_ok)]

  def row_chunks(r, chunk_starts, chunk_ok):
    """Row row0 + r (gated), fp32, one [block_k] piece per chunk, zero outside."""
    pieces = []
    for start, ok in zip(chunk_starts, chunk_ok):
      ok = ok & (row0 + r < x_ref.shape[0])
      u = plgpu.load(x_ref.at[row0 + r, pl.ds(start, block_k)], mask=ok, other=0.0)
      u = u.astype(_F32)
      if g_ref is not None:
        z = plgpu.load(g_ref.at[row0 + r, pl.ds(start, block_k)], mask=ok, other=0.0)
        z = z.astype(_F32)
        u = u * z * jax.nn.sigmoid(z)
      pieces.append(u)
    return pieces

  xs = [row_chunks(r, w_starts, w_ok) for r in range(rows)]
  full = xs if whole or nws is None else [
      row_chunks(r, starts, [ks < k for ks in channels]) for r in range(rows)]
  ws = [w.astype(product_dtype).astype(_F32) for w in ws]
  for r in range(rows):
    if nws is not None:
      sums = [sum(jnp.sum(jnp.where(in_group[c][g], u * u, 0.0)) for c, u in enumerate(full[r]))
              for g in range(groups)]
      inv_rms = [jax.lax.rsqrt(s / group_size + eps) for s in sums]
    acc = jnp.zeros((block_k, block_n), _F32)
    for c, u in enumerate(xs[r]):
      if nws is not None:
        ks = w_channels[c]
        scale = inv_rms[0] if groups == 1 else sum(
            jnp.where((ks >= g * group_size) & (ks < (g + 1) * group_size), inv, 0.0)
            for g, inv in enumerate(inv_rms))
        u = u * scale * nws[c]
      xn = u.astype(dtype).astype(_F32)
      acc = acc + xn[:, None] * ws[c]
    ok = col_ok & (row0 + r < x_ref.shape[0])
    out = jnp.sum(acc, axis=0)
    if not whole:     # a partial sum, fp32; the wrapper adds the splits and rounds
      plgpu.store(o_ref.at[split, row0 + r, pl.ds(col0, block_n)], out, mask=ok)
      continue
    out = out.astype(product_dtype)
    if r_ref is not None:
      res = plgpu.load(r_ref.at[row0 + r, pl.ds(col0, block_n)], mask=ok, other=0.0)
      res = res.astype(_F32)
      if m_ref is None:
        out = res + out.astype(_F32)
      else:     # residual + mix * (product - residual): a SAL's mix of eq. 5
        out = res + m_ref[jnp.minimum(row0 + r, x_ref.shape[0] - 1)] * (out.astype(_F32) - res)
    plgpu.store(o_ref.at[row0 + r, pl.ds(col0, block_n)], out.astype(o_ref.dtype), mask=ok)


def _kernel(*refs, ns, gated, normed, has_residual, mixed, block_n, product_dtypes, **kw):
  """Operands x, [gate], [norm weight], w_1 .. w_m, [residual, [mix]]; outputs o_1 .. o_m. The
  column blocks of all m products form one grid axis: weight i takes cdiv(n_i, block_n) of
  them, so a single launch covers every product of the shared row."""
  x_ref, *refs = refs
  g_ref = refs.pop(0) if gated else None
  nw_ref = refs.pop(0) if normed else None
  w_refs, refs = refs[:len(ns)], refs[len(ns):]
  r_ref = refs.pop(0) if has_residual else None
  m_ref = refs.pop(0) if mixed else None
  o_refs = refs
  # Program ids are read here, outside pl.when: interpret mode cannot read them in a branch.
  row0 = pl.program_id(0) * kw["rows"]
  block = pl.program_id(1)
  split = pl.program_id(2)
  first = 0
  for w_ref, o_ref, n, product_dtype in zip(w_refs, o_refs, ns, product_dtypes):
    blocks = pl.cdiv(n, block_n)

    def body(w_ref=w_ref, o_ref=o_ref, n=n, first=first, product_dtype=product_dtype):
      _matvec_block(x_ref, g_ref, nw_ref, w_ref, r_ref, m_ref, o_ref, row0=row0,
                    col0=(block - first) * block_n, split=split, n=n, block_n=block_n,
                    product_dtype=product_dtype, **kw)

    if len(ns) == 1:
      body()
    else:
      pl.when((block >= first) & (block < first + blocks))(body)
    first += blocks


def default_blocks(k: int, block_k: int) -> tuple[int, int]:
  """(block_n, k_splits) for k channels: below SPLIT_K_FROM the widest power-of-two column
  block (8 .. 64) whose [k, block_n] weight slice stays near _SLICE_ELEMENTS, unsplit (32
  for the 190M in-projection, k 768); from it on, 64 columns and one block_k chunk of k per
  program."""
  if k >= SPLIT_K_FROM:
    return 64, pl.cdiv(k, block_k)
  block_n = 64
  while block_n > 8 and k * block_n > _SLICE_ELEMENTS:
    block_n //= 2
  return block_n, 1


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "group_size", "product_dtypes",
                                             "block_k", "block_n", "k_splits", "num_warps",
                                             "interpret"))
def norm_matvec_gpu(x, norm_weight, w, *, eps: float | None = None, dtype, gate=None,
                    group_size: int | None = None, residual=None, mix=None,
                    product_dtypes: tuple | None = None, block_k: int = 256,
                    block_n: int | None = None, k_splits: int | None = None,
                    num_warps: int = 4, interpret: bool = False):
  """(residual +) RMSNorm(x [* silu(gate)]) @ w; see reference.norm_matvec_reference.

  x: [b, k]; gate: [b, >= k] (its first k columns are used, so a slice of a wider
  projection need not be copied out); norm_weight: [k], or None (no normalisation);
  w: [k, n] (any float dtype; rounded to `dtype` as loaded), or a tuple of such weights,
  all products in one launch; residual: [b, n] (a single weight only); mix: [b] fp32, with a
  residual: residual + mix * (product - residual) instead of residual + product;
  product_dtypes: one dtype per weight, which that weight is rounded to and its product
  returned in (default dtype; the row is rounded to dtype either way). block_k and block_n:
  powers of two. k_splits > 1 splits the channels among that many programs per column
  block, which write fp32 partial products that XLA adds up (with the residual) after the
  kernel. block_n and k_splits default to default_blocks(k, block_k).
  Returns [b, n], or a tuple of [b, n_i] for a tuple of weights.
  """
  check_norm_matvec_operands(x, norm_weight, w, eps=eps, gate=gate, group_size=group_size,
                             residual=residual, mix=mix, product_dtypes=product_dtypes)
  b, k = x.shape
  ws = tuple(w) if isinstance(w, (tuple, list)) else (w,)
  product_dtypes = tuple(jnp.dtype(t) for t in product_dtypes or (dtype,) * len(ws))
  default_n, default_splits = default_blocks(k, block_k)
  block_n = block_n or default_n
  k_splits = default_splits if k_splits is None else k_splits
  for name, v in (("block_k", block_k), ("block_n", block_n)):
    if v & (v - 1):
      raise ValueError(f"{name}={v} must be a power of two (a Triton block)")
  if k_splits < 1:
    raise ValueError(f"k_splits={k_splits} must be at least 1")
  rows = min(b, MAX_ROWS)
  dtype = jnp.dtype(dtype)
  ns = tuple(wi.shape[1] for wi in ws)
  k_per_split = pl.cdiv(pl.cdiv(k, k_splits), block_k) * block_k
  splits = pl.cdiv(k, k_per_split)      # no split left empty
  if splits > 1:
    out_shapes = tuple(jax.ShapeDtypeStruct((splits, b, n), _F32) for n in ns)
  else:
    out_shapes = tuple(jax.ShapeDtypeStruct((b, n), _F32 if residual is not None else pd)
                       for n, pd in zip(ns, product_dtypes))
  kernel = functools.partial(
      _kernel, ns=ns, k=k, rows=rows, block_k=block_k, block_n=block_n,
      k_per_split=k_per_split if splits > 1 else k, eps=eps, group_size=group_size or k,
      gated=gate is not None, normed=norm_weight is not None,
      has_residual=residual is not None and splits == 1,
      mixed=mix is not None and splits == 1, dtype=dtype, product_dtypes=product_dtypes)
  operands = [x] + [t for t in (gate, norm_weight) if t is not None] + list(ws)
  if splits == 1:
    operands += [t for t in (residual, None if mix is None else mix.astype(_F32))
                 if t is not None]
  out = pl.pallas_call(
      kernel, out_shape=out_shapes,
      grid=(pl.cdiv(b, rows), sum(pl.cdiv(n, block_n) for n in ns), splits),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="norm_matvec")(*operands)
  if splits > 1:
    out = tuple(jnp.sum(partial, axis=0).astype(pd) for partial, pd in zip(out, product_dtypes))
    if residual is not None:
      res = residual.astype(_F32)
      out = (res + out[0].astype(_F32) if mix is None
             else res + mix.astype(_F32)[:, None] * (out[0].astype(_F32) - res),)
  return out if isinstance(w, (tuple, list)) else out[0]
