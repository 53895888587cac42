"""Decode-step operations: one token per row through a Mamba-2 block in two calls.

    zxbcdt, conv = mamba2_in_proj(h, block norm, in_proj, conv cache and parameters)
    h, ssm       = mamba2_ssm_out(zxbcdt, ssm cache, dt / A / D, gated norm, out_proj, h)

The SAL and attention blocks use norm_matvec for their projections too: (q, k, v) in one
call, the output projection without a norm, and a SwiGLU as two calls, (up, gate) =
norm_matvec(h, norm, (w3, w1)) and h + norm_matvec(up, None, w2, gate=gate, residual=h).

Decoding is latency-bound: per token each layer moves a few megabytes, and on a GPU the time
goes to many small kernels, each paying a few microseconds of memory latency. XLA compiles
these steps to about nine kernels per Mamba-2 block and writes the [d_inner, d_model]
product of its out-projection to memory, because it turns small dots into a multiply and a
reduction. The Pallas Triton kernels of pallas_kernels/decode do each line in one kernel
(the second one plus a small kernel that sums its per-program partial products). They are
faster at
batch 1 (docs/kernels/decode.md has the figures), so 'auto' takes them on a GPU for one
row; from three rows on the projection kernels ran slower than XLA, so larger batches keep
the plain jnp forms (the same operations as the model's layers).
"""
from __future__ import annotations

from pallas_kernels.decode.reference import (mamba2_in_proj_reference, mamba2_ssm_out_reference,
                                             norm_matvec_reference)
from taipan_jax.ops.dispatch import Kernels, choose, power_of_two

# 'auto' takes the Mamba-2 block kernels on a GPU up to this many rows. Measured on an H100
# (the two projections, weights in L2): 7.3 us against XLA's 15.1 at 1 row, a tie at 2
# (10.6 against 10.7), slower at 3 and 4 (14.4 and 17.7 against 10.4 and 10.7).
_BLOCK_KERNEL_MAX_BATCH = 1
# norm_matvec's kernel was measured up to this k (the 190M SwiGLU's down-projection, split
# over k: 6.6 us against XLA's 8.7, weights from memory); past it 'auto' keeps XLA, for the
# Mamba-2 in-projection kernel (measured at k 768) too.
_MATVEC_KERNEL_MAX_K = 2048


# The decode kernels are Triton kernels; there is no TPU decode kernel. The jnp forms the
# 'xla' route runs are the same functions the kernels are tested against.
KERNELS = Kernels("decode", {"gpu": {"head_dim": power_of_two(), "d_state": power_of_two()}})


def norm_matvec(x, norm_weight, w, *, eps: float | None = None, dtype, gate=None,
                group_size: int | None = None, residual=None, mix=None,
                product_dtypes: tuple | None = None, implementation: str = "auto",
                interpret: bool = False):
  """(residual +) RMSNorm(x [* silu(gate)]) @ w for one token per row.

  x: [batch, k]; gate: [batch, >= k] (its first k columns); norm_weight: [k], or None for a
  plain (optionally gated) product (eps: the norm's epsilon, needed only with a norm
  weight); w: [k, n], or a tuple of weights that share the
  normalised row (q, k and v; a SwiGLU's two up-projections), one kernel for all of them;
  residual: [batch, n] (one weight only); mix: [batch], with a residual: residual +
  mix * (product - residual) (a SAL's mix, eq. 5).
  The normalised row is rounded to `dtype` and multiplied in `dtype`, as an nnx.Linear of
  that dtype does, or for weight i in product_dtypes[i] (the SAL's fp32 gate beside its bf16
  q, k, v); group_size channels (default k) are normalised together.
  Returns [batch, n] in the product's dtype, or fp32 with a residual; a tuple for a tuple of
  weights.
  """
  kw = dict(eps=eps, dtype=dtype, gate=gate, group_size=group_size, residual=residual,
            mix=mix, product_dtypes=product_dtypes)
  route = choose(KERNELS, implementation, interpret,
                 kernel_by_default=(x.shape[0] <= _BLOCK_KERNEL_MAX_BATCH
                                    and x.shape[1] <= _MATVEC_KERNEL_MAX_K))
  if route.implementation == "xla":
    return norm_matvec_reference(x, norm_weight, w, **kw)
  from pallas_kernels.decode.norm_matvec import norm_matvec_gpu
  return norm_matvec_gpu(x, norm_weight, w, interpret=route.interpret, **kw)


def mamba2_in_proj(x, norm_weight, w_t, conv_state, conv_weight, conv_bias, *, eps: float,
                   dtype, d_inner: int, implementation: str = "auto", interpret: bool = False):
  """RMSNorm(x) @ in_proj, its x B C columns through the causal convolution over the cached
  inputs (SiLU after it).

  x: [batch, d_model]; w_t: [d_inner + conv_dim + heads, d_model], in_proj transposed
  (outputs z | x B C | dt), the layout in which the kernel reads whole rows (a decode loop
  transposes it once, inference.weights.prepare_decode_weights);
  conv_state: [batch, d_conv - 1, conv_dim]; conv_weight: [d_conv, conv_dim].
  Returns (zxbcdt [batch, d_inner + conv_dim + heads] in dtype, x B C convolved; the new
  conv_state).
  """
  args = (x, norm_weight, w_t, conv_state, conv_weight, conv_bias)
  kw = dict(eps=eps, dtype=dtype, d_inner=d_inner)
  route = choose(KERNELS, implementation, interpret,
                 kernel_by_default=(x.shape[0] <= _BLOCK_KERNEL_MAX_BATCH
                                    and x.shape[1] <= _MATVEC_KERNEL_MAX_K))
  if route.implementation == "xla":
    return mamba2_in_proj_reference(*args, **kw)
  from pallas_kernels.decode.mamba2_in_proj import mamba2_in_proj_gpu
  return mamba2_in_proj_gpu(*args, interpret=route.interpret, **kw)


def mamba2_ssm_out(zxbcdt, ssm_state, dt_bias, A_log, D, norm_weight, w, residual, *,
                   eps: float, dtype, group_size: int, heads: int, head_dim: int, n_groups: int,
                   d_state: int, implementation: str = "auto", interpret: bool = False):
  """The rest of a Mamba-2 block's token: softplus dt, SSD state update, y = S C + D x, the
  gated RMSNorm (groups of group_size channels), the out-projection and the residual.

  zxbcdt: [batch, d_inner + conv_dim + heads] from mamba2_in_proj; ssm_state:
  [batch, heads, head_dim, d_state] fp32; dt_bias, A_log, D: [heads]; norm_weight: [d_inner];
  w: [d_inner, d_model]; residual: [batch, d_model] fp32.
  Returns (residual + out [batch, d_model] fp32, the new ssm_state).
  """
  args = (zxbcdt, ssm_state, dt_bias, A_log, D, norm_weight, w, residual)
  kw = dict(eps=eps, dtype=dtype, group_size=group_size, heads=heads, head_dim=head_dim,
            n_groups=n_groups, d_state=d_state)
  route = choose(KERNELS, implementation, interpret, head_dim=head_dim, d_state=d_state,
                 kernel_by_default=zxbcdt.shape[0] <= _BLOCK_KERNEL_MAX_BATCH)
  if route.implementation == "xla":
    return mamba2_ssm_out_reference(*args, **kw)
  from pallas_kernels.decode.mamba2_ssm_out import mamba2_ssm_out_gpu
  return mamba2_ssm_out_gpu(*args, interpret=route.interpret, **kw)
