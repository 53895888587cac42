"""A Mamba-2 mixer's decode in-projection with its causal convolution: one Pallas Triton kernel.

    zxbcdt = RMSNorm(h) @ in_proj, then its x B C columns <- silu(conv(cached inputs, new))

The weight comes transposed, w_t = in_proj^T: [d_inner + conv_dim + heads, d_model], so that
a program reads whole rows of it. grid (row blocks, output blocks of block_n): a program
loads its [block_n, d_model] slice (the k chunks unrolled, every load issued up front),
normalises its rows' h and reduces w_t * h_n over k. Over the untransposed [d_model, n]
weight each program read 64-byte pieces of 768 rows; on an H200 the 190M in-projection took
8.1 µs that way and 5.8 µs over whole rows (docs/kernels/decode.md).

The convolution is depthwise: channel c of x B C needs only its own last d_conv inputs, so
the program that computes a block of the x B C outputs convolves them before storing them
and shifts their cached inputs in place (the cache is aliased to the output): no other
program reads or writes those channels. Done in a kernel of its own, the convolution costs a
launch, and it cannot shift the cache in place, because every head's program reads the
shared B and C channels: the shifted cache went to a new buffer, which XLA then copied into
the decode loop's carry (about 1 µs a layer on an H100). block_n divides d_inner and
conv_dim, so a block lies wholly in z, in x B C or in dt; only x B C blocks convolve.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode.norm_matvec import MAX_ROWS
from pallas_kernels.decode.reference import check_mamba2_in_proj_operands

_F32 = jnp.float32


def _kernel(x_ref, nw_ref, wt_ref, conv_ref, cw_ref, cb_ref, o_ref, conv_out_ref, *, d_inner,
            d_conv, rows, block_n, block_k, eps, dtype, barrier):
  n, k = wt_ref.shape
  conv_dim = conv_ref.shape[2]
  row0 = pl.program_id(0) * rows
  j0 = pl.program_id(1) * block_n
  out_ok = j0 + jnp.arange(block_n) < n
  # jnp starts, not ints: the last chunk may overhang k (masked), which a static slice refuses.
  starts = [jnp.int32(s) for s in range(0, k, block_k)]
  k_ok = [s + jnp.arange(block_k) < k for s in starts]
  ws = [plgpu.load(wt_ref.at[pl.ds(j0, block_n), pl.ds(s, block_k)],
                   mask=out_ok[:, None] & ok[None, :], other=0.0).astype(dtype).astype(_F32)
        for s, ok in zip(starts, k_ok)]
  nws = [plgpu.load(nw_ref.at[pl.ds(s, block_k)], mask=ok, other=0.0).astype(_F32)
         for s, ok in zip(starts, k_ok)]
  # The convolution's operands, for x B C blocks. Clamped into range, so every program may
  # load (a z or dt block's loads are discarded by the where below and its stores masked
  # off): no branch on the block's kind.
  in_conv = (j0 >= d_inner) & (j0 < d_inner + conv_dim)
  chans = pl.ds(jnp.clip(j0 - d_inner, 0, conv_dim - block_n), block_n)
  taps = [plgpu.load(cw_ref.at[jnp.int32(i), chans]).astype(_F32) for i in range(d_conv)]
  bias = plgpu.load(cb_ref.at[chans]).astype(_F32)
  for r in range(rows):
    row = row0 + r
    row_ok = row < x_ref.shape[0]
    xs = [plgpu.load(x_ref.at[row, pl.ds(s, block_k)], mask=ok & row_ok, other=0.0).astype(_F32)
          for s, ok in zip(starts, k_ok)]
    inv_rms = jax.lax.rsqrt(sum(jnp.sum(u * u) for u in xs) / k + eps)
    acc = jnp.zeros((block_n, block_k), _F32)
    for u, nw, w in zip(xs, nws, ws):
      acc = acc + w * (u * inv_rms * nw).astype(dtype).astype(_F32)[None, :]
    out = jnp.sum(acc, axis=1).astype(dtype)                          # [block_n]
    ok = out_ok & row_ok
    window = [plgpu.load(conv_ref.at[row, jnp.int32(i), chans], mask=ok, other=0.0)
              for i in range(d_conv - 1)]
    window.append(out.astype(conv_ref.dtype))
    conv = bias
    for tap, u in zip(taps, window):
      conv = conv + u.astype(_F32) * tap
    if barrier:
      # The cache is shifted in place, and a [block_n] vector is held by many threads (8
      # warps): the thread that stores a slot need not be the one whose load of the old value
      # fed its copy of conv. Without this barrier a thread's load could see another's store
      # (seen on an H200: a few x B C outputs wrong, the cache right, on the first call).
      plgpu.debug_barrier()
    for i in range(d_conv - 1):
      plgpu.store(conv_out_ref.at[row, jnp.int32(i), chans], window[i + 1], mask=ok & in_conv)
    out = jnp.where(in_conv, (conv * jax.nn.sigmoid(conv)).astype(dtype), out)
    plgpu.store(o_ref.at[row, pl.ds(j0, block_n)], out, mask=ok)


def default_block_n(d_inner: int, conv_dim: int) -> int:
  """16 outputs a program (measured on an H200 for the 190M in-projection: 16 rows 5.8 µs, 8
  rows 6.0, 32 rows 5.8 at 8 warps and 6.6 at 4), halved until it divides d_inner and
  conv_dim (a block must not straddle z | x B C | dt)."""
  common = math.gcd(d_inner, conv_dim)
  return min(16, common & -common)


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "d_inner", "block_k", "block_n",
                                             "num_warps", "interpret"))
def mamba2_in_proj_gpu(x, norm_weight, w_t, conv_state, conv_weight, conv_bias, *, eps: float,
                       dtype, d_inner: int, block_k: int = 256, block_n: int | None = None,
                       num_warps: int = 8, interpret: bool = False):
  """See reference.mamba2_in_proj_reference (same arguments and results).

  x: [b, d_model] the residual stream; w_t: [d_inner + conv_dim + heads, d_model], in_proj
  transposed; conv_state: [b, d_conv - 1, conv_dim], updated in place. block_n (a power of
  two that divides d_inner and conv_dim) defaults to default_block_n; block_k: a power of
  two.
  """
  check_mamba2_in_proj_operands(x, norm_weight, w_t, conv_state, conv_weight, conv_bias,
                                d_inner=d_inner)
  b = x.shape[0]
  n = w_t.shape[0]
  d_conv, conv_dim = conv_weight.shape
  block_n = block_n or default_block_n(d_inner, conv_dim)
  if block_n & (block_n - 1) or d_inner % block_n or conv_dim % block_n:
    raise ValueError(f"block_n={block_n} must be a power of two dividing d_inner={d_inner} and "
                     f"conv_dim={conv_dim} (a block must lie in z, x B C or dt)")
  if block_k & (block_k - 1):
    raise ValueError(f"block_k={block_k} must be a power of two (a Triton block)")
  rows = min(b, MAX_ROWS)
  kernel = functools.partial(_kernel, d_inner=d_inner, d_conv=d_conv, rows=rows,
                             block_n=block_n, block_k=block_k, eps=eps, dtype=jnp.dtype(dtype),
                             barrier=not interpret)     # interpret mode runs no threads
  return pl.pallas_call(
      kernel, out_shape=(jax.ShapeDtypeStruct((b, n), dtype),
                         jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype)),
      grid=(pl.cdiv(b, rows), pl.cdiv(n, block_n)), input_output_aliases={3: 1},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mamba2_in_proj")(
          x, norm_weight, w_t, conv_state, conv_weight, conv_bias)
