"""A Mamba-2 mixer's decode token after its in-projection: SSD state update, gated RMSNorm and
out-projection, two Pallas Triton kernels.

    y   = S C + D x,  S <- exp(dt A) S + dt x B^T          (per head, state in place)
    out = h + RMSNorm(y * silu(z)) @ out_proj               (groups of group_size channels)

grid (batch, heads, head_dim / block_p). A program owns block_p channels of one head: it
updates their rows of the state, forms u = y * silu(z) for them, and multiplies u * norm
weight by the matching block_p rows of out_proj (all d_model columns, block_n at a time,
every load issued up front). The norm's scale is one number per row and group,
rsqrt(mean(u^2) + eps), so it factors out of the product: each program writes its fp32
partial product and its partial sum of squares. A second kernel (grid: batch, column blocks)
sums the squares per group, scales and adds the partials and adds the residual; XLA spent
three kernels on that sum (3.7 µs a layer on an H200, against 2.0 for this one over 48
partials, 2.5 over 96). Unlike norm_matvec, the normalised row is not rounded to the compute
dtype before the product; the results differ by that one rounding.

Fusing the state update into the out-projection saves a launch and a round trip of y
through memory per layer; each head's state rows are read and written by one program only,
so the state is updated in place.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode.reference import check_mamba2_ssm_out_operands

_F32 = jnp.float32


def _kernel(zx_ref, ssm_ref, dtb_ref, alog_ref, d_ref, nw_ref, w_ref, part_ref, ss_ref,
            ssm_out_ref, *, heads, head_dim, n_groups, d_state, block_p, block_n, dtype):
  bi, hi, pi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  d_inner = heads * head_dim
  conv_dim = d_inner + 2 * n_groups * d_state
  n = w_ref.shape[1]
  gi = hi // (heads // n_groups)
  c0 = hi * head_dim + pi * block_p              # this program's channels c0 .. c0 + block_p
  split = c0 // block_p
  # The weight first: its loads are the long ones, all in flight while the state updates.
  # jnp starts, not ints: the last block may overhang n (masked), which a static slice refuses.
  starts = [jnp.int32(j) for j in range(0, n, block_n)]
  col_oks = [j + jnp.arange(block_n) < n for j in starts]
  ws = [plgpu.load(w_ref.at[pl.ds(c0, block_p), pl.ds(j, block_n)], mask=ok[None, :],
                   other=0.0) for j, ok in zip(starts, col_oks)]
  load = lambda start, size: plgpu.load(zx_ref.at[bi, pl.ds(start, size)]).astype(_F32)
  z = load(c0, block_p)
  x = load(d_inner + c0, block_p)
  B = load(2 * d_inner + gi * d_state, d_state)
  C = load(2 * d_inner + (n_groups + gi) * d_state, d_state)
  raw = zx_ref[bi, d_inner + conv_dim + hi].astype(_F32) + dtb_ref[hi].astype(_F32)
  dt = jnp.maximum(raw, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(raw)))       # softplus
  decay = jnp.exp(dt * -jnp.exp(alog_ref[hi].astype(_F32)))
  ps = pl.ds(pi * block_p, block_p)
  state = decay * plgpu.load(ssm_ref.at[bi, hi, ps, :]) + (x * dt)[:, None] * B[None, :]
  plgpu.store(ssm_out_ref.at[bi, hi, ps, :], state)
  y = jnp.sum(state * C[None, :], axis=1).astype(dtype).astype(_F32) + x * d_ref[hi].astype(_F32)
  u = y * z * jax.nn.sigmoid(z)
  ss_ref[split, bi] = jnp.sum(u * u)
  v = u * plgpu.load(nw_ref.at[pl.ds(c0, block_p)]).astype(_F32)
  for j, ok, w in zip(starts, col_oks, ws):
    part = jnp.sum(v[:, None] * w.astype(dtype).astype(_F32), axis=0)
    plgpu.store(part_ref.at[split, bi, pl.ds(j, block_n)], part, mask=ok)


def _finish_kernel(part_ref, ss_ref, r_ref, o_ref, *, splits, groups, group_splits, eps,
                   group_size, block_n, dtype):
  """o[b, cols] = residual + sum_s scale(group of s) * part[s, b, cols], rounded as a product."""
  bi, j = pl.program_id(0), pl.program_id(1)
  n = o_ref.shape[1]
  padded = pl.next_power_of_2(splits)
  s_idx = jnp.arange(padded)
  cols = pl.ds(j * block_n, block_n)
  col_ok = j * block_n + jnp.arange(block_n) < n
  ss = plgpu.load(ss_ref.at[pl.ds(0, padded), bi], mask=s_idx < splits, other=0.0)
  scale = jnp.zeros((padded,), _F32)
  for g in range(groups):          # few: one per norm group
    in_g = (s_idx >= g * group_splits) & (s_idx < (g + 1) * group_splits)
    inv = jax.lax.rsqrt(jnp.sum(jnp.where(in_g, ss, 0.0)) / group_size + eps)
    scale = jnp.where(in_g, inv, scale)
  part = plgpu.load(part_ref.at[pl.ds(0, padded), bi, cols],
                    mask=(s_idx < splits)[:, None] & col_ok[None, :], other=0.0)
  out = jnp.sum(part * scale[:, None], axis=0).astype(dtype).astype(_F32)
  res = plgpu.load(r_ref.at[bi, cols], mask=col_ok, other=0.0).astype(_F32)
  plgpu.store(o_ref.at[bi, cols], res + out, mask=col_ok)


def default_block_p(head_dim: int, group_size: int) -> int:
  """16 channels a program (96 programs for the 190M mixer), fewer where head_dim or the norm
  group is smaller. Measured on an H200 (benchmarks/decode_layer.py, the 190M block): 16
  channels 18.1 µs a block, 32 19.0, 64 24.2."""
  return min(16, head_dim, group_size & -group_size)


@functools.partial(jax.jit, static_argnames=("eps", "dtype", "group_size", "heads", "head_dim",
                                             "n_groups", "d_state", "block_p", "block_n",
                                             "num_warps", "interpret"))
def mamba2_ssm_out_gpu(zxbcdt, ssm_state, dt_bias, A_log, D, norm_weight, w, residual, *,
                       eps: float, dtype, group_size: int, heads: int, head_dim: int,
                       n_groups: int, d_state: int, block_p: int | None = None,
                       block_n: int = 256, num_warps: int = 4, interpret: bool = False):
  """See reference.mamba2_ssm_out_reference (same arguments and results).

  zxbcdt: [b, d_inner + conv_dim + heads], x B C after the convolution; ssm_state:
  [b, heads, head_dim, d_state] fp32, updated in place; w: [d_inner, d_model]; residual:
  [b, d_model]. head_dim, d_state, block_p and block_n: powers of two; block_p (default
  default_block_p) divides group_size.
  """
  check_mamba2_ssm_out_operands(zxbcdt, ssm_state, dt_bias, A_log, D, norm_weight, w, residual,
                                group_size=group_size, heads=heads, head_dim=head_dim,
                                n_groups=n_groups, d_state=d_state)
  b = zxbcdt.shape[0]
  d_inner, n = w.shape
  block_p = block_p or default_block_p(head_dim, group_size)
  for name, v in (("head_dim", head_dim), ("d_state", d_state), ("block_p", block_p),
                  ("block_n", block_n)):
    if v & (v - 1):
      raise ValueError(f"the Mamba-2 decode kernel needs {name} a power of two, got {v}")
  if head_dim % block_p or group_size % block_p:
    raise ValueError(f"block_p={block_p} must divide head_dim={head_dim} and the norm's "
                     f"group_size={group_size}")
  splits = d_inner // block_p
  kernel = functools.partial(_kernel, heads=heads, head_dim=head_dim, n_groups=n_groups,
                             d_state=d_state, block_p=block_p, block_n=block_n,
                             dtype=jnp.dtype(dtype))
  part, ss, ssm = pl.pallas_call(
      kernel, out_shape=(jax.ShapeDtypeStruct((splits, b, n), _F32),
                         jax.ShapeDtypeStruct((splits, b), _F32),
                         jax.ShapeDtypeStruct(ssm_state.shape, _F32)),
      grid=(b, heads, head_dim // block_p), input_output_aliases={1: 2},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mamba2_ssm_out")(
          zxbcdt, ssm_state.astype(_F32), dt_bias, A_log, D, norm_weight, w)
  # Splits run in channel order, so a norm group's are consecutive.
  groups = d_inner // group_size
  finish_n = 64
  finish = functools.partial(_finish_kernel, splits=splits, groups=groups,
                             group_splits=splits // groups, eps=eps, group_size=group_size,
                             block_n=finish_n, dtype=jnp.dtype(dtype))
  out = pl.pallas_call(
      finish, out_shape=jax.ShapeDtypeStruct((b, n), _F32), grid=(b, pl.cdiv(n, finish_n)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret, name="mamba2_ssm_out_finish")(part, ss, residual)
  return out, ssm
