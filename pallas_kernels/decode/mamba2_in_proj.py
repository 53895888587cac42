"""A Mamba-2 mixer's decode in-projection with its causal convolution: one Pallas Triton kernel.

    zxbcdt = RMSNorm(h) @ in_proj, then its x B C columns <- silu(conv(cached inputs, new))

The convolution is depthwise: channel c of x B C needs only its own last d_conv inputs, so
the program that computes a column block of the projection convolves those columns before
storing them and shifts their cached inputs in place (the cache is aliased to the output):
no other program reads or writes those channels. Done in a kernel of its own, the
convolution costs a launch, and it cannot shift the cache in place, because every head's
program reads the shared B and C channels: the shifted cache went to a new buffer, which XLA
then copied into the decode loop's carry (about 1 µs a layer on an H100).

grid (row blocks, column blocks) as in norm_matvec, unsplit. block_n divides d_inner and
conv_dim, so a block lies wholly in z, in x B C or in dt; only x B C blocks convolve.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode.norm_matvec import MAX_ROWS, matvec_block, unsplit_block_n
from pallas_kernels.decode.reference import check_mamba2_in_proj_operands

_F32 = jnp.float32


def _kernel(x_ref, nw_ref, w_ref, conv_ref, cw_ref, cb_ref, o_ref, conv_out_ref, *, d_inner,
            d_conv, rows, block_n, **kw):
  conv_dim = conv_ref.shape[2]
  row0 = pl.program_id(0) * rows
  col0 = pl.program_id(1) * block_n
  in_conv = (col0 >= d_inner) & (col0 < d_inner + conv_dim)
  # Clamped into range, so every program may load (a z or dt block's loads are discarded
  # by the where below and its stores masked off): no branch on the block's kind.
  chans = pl.ds(jnp.clip(col0 - d_inner, 0, conv_dim - block_n), block_n)
  taps = [plgpu.load(cw_ref.at[jnp.int32(i), chans]).astype(_F32) for i in range(d_conv)]
  bias = plgpu.load(cb_ref.at[chans]).astype(_F32)
  dtype = o_ref.dtype

  def convolve(row, ok, out):
    """out: the row's [block_n] projection (dtype); for x B C columns, silu(conv)."""
    window = [plgpu.load(conv_ref.at[row, jnp.int32(i), chans], mask=ok, other=0.0)
              for i in range(d_conv - 1)]
    window.append(out.astype(conv_ref.dtype))
    acc = bias
    for tap, u in zip(taps, window):
      acc = acc + u.astype(_F32) * tap
    for i in range(d_conv - 1):
      plgpu.store(conv_out_ref.at[row, jnp.int32(i), chans], window[i + 1], mask=ok & in_conv)
    return jnp.where(in_conv, (acc * jax.nn.sigmoid(acc)).astype(dtype), out)

  matvec_block(x_ref, None, nw_ref, w_ref, None, o_ref, row0=row0, col0=col0, split=0,
               rows=rows, block_n=block_n, epilogue=convolve, **kw)


def default_block_n(k: int, d_inner: int, conv_dim: int) -> int:
  """norm_matvec's unsplit block for k channels, halved until it divides d_inner and
  conv_dim (a block must not straddle z | x B C | dt)."""
  block_n = min(unsplit_block_n(k), math.gcd(d_inner, conv_dim) & -math.gcd(d_inner, conv_dim))
  return block_n


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "d_inner", "block_k", "block_n",
                                             "num_warps", "interpret"))
def mamba2_in_proj_gpu(x, norm_weight, w, conv_state, conv_weight, conv_bias, *, eps: float,
                       dtype, d_inner: int, block_k: int = 256, block_n: int | None = None,
                       num_warps: int = 8, interpret: bool = False):
  """See reference.mamba2_in_proj_reference (same arguments and results).

  x: [b, d_model] the residual stream; w: [d_model, d_inner + conv_dim + heads];
  conv_state: [b, d_conv - 1, conv_dim], updated in place. block_n (a power of two that
  divides d_inner and conv_dim) defaults to default_block_n. 8 warps: on an H200 the 190M
  block took 18.4 µs with them, 19.0 with 4 (benchmarks/decode_layer.py).
  """
  check_mamba2_in_proj_operands(x, norm_weight, w, conv_state, conv_weight, conv_bias,
                                d_inner=d_inner)
  b, k = x.shape
  n = w.shape[1]
  d_conv, conv_dim = conv_weight.shape
  block_n = block_n or default_block_n(k, d_inner, conv_dim)
  if block_n & (block_n - 1) or d_inner % block_n or conv_dim % block_n:
    raise ValueError(f"block_n={block_n} must be a power of two dividing d_inner={d_inner} and "
                     f"conv_dim={conv_dim} (a block must lie in z, x B C or dt)")
  rows = min(b, MAX_ROWS)
  kernel = functools.partial(
      _kernel, d_inner=d_inner, d_conv=d_conv, rows=rows, block_n=block_n, k=k, n=n,
      block_k=block_k, k_per_split=k, eps=eps, group_size=k, dtype=jnp.dtype(dtype))
  return pl.pallas_call(
      kernel, out_shape=(jax.ShapeDtypeStruct((b, n), dtype),
                         jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype)),
      grid=(pl.cdiv(b, rows), pl.cdiv(n, block_n)), input_output_aliases={3: 1},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mamba2_in_proj")(
          x, norm_weight, w, conv_state, conv_weight, conv_bias)
