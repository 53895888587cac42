"""One decode token of a Mamba-2 mixer between its projections, one Pallas Triton kernel.

grid (batch, heads, head_dim / block_p). A program owns block_p rows of head h's state in
one row: it convolves those x channels and the head's group's B and C channels over the cached inputs plus the new one, takes dt through
softplus, updates the head's [head_dim, d_state] state in place and writes y = S C + D x.
XLA spends five or so kernels on the same work (convolution, softplus, state shift and copy,
state update), each a launch of a few microseconds for a few kilobytes.

Every program reads the old convolution inputs of its group's B and C channels, so the new
ones go to a separate buffer (writing them in place would race with the group's other
heads); the first program of each group writes them. The SSM state is aliased in place: no other
program reads a head's state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_F32 = jnp.float32


def _kernel(zx_ref, conv_ref, ssm_ref, cw_ref, cb_ref, dtb_ref, alog_ref, d_ref,
            y_ref, conv_out_ref, ssm_out_ref, *, heads, head_dim, n_groups, d_state, d_conv,
            block_p):
  bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  d_inner = heads * head_dim
  conv_dim = d_inner + 2 * n_groups * d_state
  rep = heads // n_groups
  gi = hi // rep
  dtype = conv_ref.dtype

  def convolve(start, size, write):
    """silu(causal conv) of channels start .. start + size, rounded to the cache dtype, fp32;
    with write, also stores their shifted inputs into conv_out."""
    chans = pl.ds(start, size)
    rows = [plgpu.load(conv_ref.at[bi, jnp.int32(i), chans]) for i in range(d_conv - 1)]
    rows.append(plgpu.load(zx_ref.at[bi, pl.ds(d_inner + start, size)]).astype(dtype))
    acc = plgpu.load(cb_ref.at[chans]).astype(_F32)
    for i, row in enumerate(rows):
      acc = acc + row.astype(_F32) * plgpu.load(cw_ref.at[jnp.int32(i), chans]).astype(_F32)
    if write is not None:
      @pl.when(write)
      def _():
        for i in range(d_conv - 1):
          plgpu.store(conv_out_ref.at[bi, jnp.int32(i), chans], rows[i + 1])
    return (acc * jax.nn.sigmoid(acc)).astype(dtype).astype(_F32)

  x = convolve(hi * head_dim + pi * block_p, block_p, True)                # [bp]
  first_of_group = (hi % rep == 0) & (pi == 0)
  B = convolve(d_inner + gi * d_state, d_state, first_of_group)           # [n]
  C = convolve(d_inner + (n_groups + gi) * d_state, d_state, first_of_group)

  raw = zx_ref[bi, d_inner + conv_dim + hi].astype(_F32) + dtb_ref[hi].astype(_F32)
  dt = jnp.maximum(raw, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(raw)))       # softplus
  decay = jnp.exp(dt * -jnp.exp(alog_ref[hi].astype(_F32)))
  ps = pl.ds(pi * block_p, block_p)
  state = plgpu.load(ssm_ref.at[bi, hi, ps, :]).astype(_F32)              # [bp, n]
  state = decay * state + (x * dt)[:, None] * B[None, :]
  plgpu.store(ssm_out_ref.at[bi, hi, ps, :], state)
  y = jnp.sum(state * C[None, :], axis=1)
  y = y.astype(dtype).astype(_F32) + x * d_ref[hi].astype(_F32)
  plgpu.store(y_ref.at[bi, pl.ds(hi * head_dim + pi * block_p, block_p)], y)


@functools.partial(jax.jit, static_argnames=("heads", "head_dim", "n_groups", "d_state",
                                             "block_p", "num_warps", "interpret"))
def mamba2_step_gpu(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, *,
                    heads: int, head_dim: int, n_groups: int, d_state: int, block_p: int = 16,
                    num_warps: int = 2, interpret: bool = False):
  """See reference.mamba2_step_reference (same arguments and results). head_dim and d_state
  must be powers of two (Triton block shapes); block_p rows of a head's state per program
  (more programs than heads keep more of the GPU's memory pipes busy)."""
  b = zxbcdt.shape[0]
  d_conv = conv_weight.shape[0]
  d_inner = heads * head_dim
  conv_dim = d_inner + 2 * n_groups * d_state
  for name, v in (("head_dim", head_dim), ("d_state", d_state)):
    if v & (v - 1):
      raise ValueError(f"the Mamba-2 decode kernel needs {name} a power of two, got {v}")
  if zxbcdt.shape != (b, d_inner + conv_dim + heads):
    raise ValueError(f"zxbcdt {zxbcdt.shape} is not [batch, {d_inner + conv_dim + heads}] for "
                     f"{heads} heads of {head_dim}, {n_groups} groups of d_state {d_state}")
  if conv_state.shape != (b, d_conv - 1, conv_dim):
    raise ValueError(f"conv_state {conv_state.shape} is not [{b}, {d_conv - 1}, {conv_dim}]")
  block_p = min(block_p, head_dim)
  kernel = functools.partial(_kernel, heads=heads, head_dim=head_dim, n_groups=n_groups,
                             d_state=d_state, d_conv=d_conv, block_p=block_p)
  out_shape = (jax.ShapeDtypeStruct((b, d_inner), _F32),
               jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
               jax.ShapeDtypeStruct(ssm_state.shape, _F32))
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(b, heads, head_dim // block_p), input_output_aliases={2: 2},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mamba2_step")(
          zxbcdt, conv_state, ssm_state.astype(_F32), conv_weight, conv_bias, dt_bias, A_log, D)
