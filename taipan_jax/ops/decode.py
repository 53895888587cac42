"""Decode-step operations: one token per row through a Mamba-2 block in three calls.

    zxbcdt    = norm_matvec(h, block norm, in_proj)
    y, caches = mamba2_decode_step(zxbcdt, caches, conv / dt / A / D parameters)
    h         = norm_matvec(y, gated norm, out_proj, gate=z, residual=h)

The SAL and attention blocks use norm_matvec for their projections too: (q, k, v) in one
call, the output projection without a norm, and a SwiGLU as two calls, (up, gate) =
norm_matvec(h, norm, (w3, w1)) and h + norm_matvec(up, None, w2, gate=gate, residual=h).

Decoding is latency-bound: per token each layer moves a few megabytes, and on a GPU the time
goes to many small kernels, each paying a few microseconds of memory latency. XLA compiles
these steps to about nine kernels per Mamba-2 block and writes the [d_inner, d_model]
product of its out-projection to memory, because it turns small dots into a multiply and a
reduction. The Pallas Triton kernels of pallas_kernels/decode do each line in one kernel. On
an H100 they are faster at batch 1 (the 190M Taipan's step 0.51 ms against 0.78 with every
op on XLA, docs/kernels/decode.md), so 'auto' takes them on a GPU for one row; from three
rows on they ran slower than XLA, so larger batches keep the plain jnp forms (the same
operations as the model's layers).
"""
from __future__ import annotations

import os

import jax

from pallas_kernels.decode.reference import mamba2_step_reference, norm_matvec_reference

IMPLEMENTATIONS = ("auto", "reference", "pallas", "interpret")
# 'auto' takes the Mamba-2 block kernels on a GPU up to this many rows. Measured on an H100
# (the two projections, weights in L2): 7.3 us against XLA's 15.1 at 1 row, a tie at 2
# (10.6 against 10.7), slower at 3 and 4 (14.4 and 17.7 against 10.4 and 10.7).
_BLOCK_KERNEL_MAX_BATCH = 1
# norm_matvec's kernel was measured up to this k (the 190M SwiGLU's down-projection, split
# over k: 6.6 us against XLA's 8.7, weights from memory); past it 'auto' keeps XLA.
_MATVEC_KERNEL_MAX_K = 2048


def resolve_decode_implementation(implementation: str = "auto", *, head_dim: int | None = None,
                                  d_state: int | None = None,
                                  kernel_by_default: bool = False) -> str:
  """'auto' defers to $TAIPAN_KERNELS, then to kernel_by_default: whether the op has measured
  its Triton kernel faster ('pallas') at this call's shape or not (the jnp path);
  docs/kernels/decode.md has the measurements behind each op's rule. 'pallas' takes the
  Triton kernels on a GPU (head_dim and d_state powers of two); there is no TPU decode
  kernel, so elsewhere 'pallas' runs the jnp path. 'interpret' runs the Triton kernels in
  Pallas interpret mode on any backend. Returns 'reference', 'pallas_gpu' or 'interpret'."""
  if implementation == "auto":
    implementation = os.environ.get("TAIPAN_KERNELS", "auto")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"decode implementation {implementation!r} is unknown; use one of "
                     f"{IMPLEMENTATIONS} (argument, mamba.kernel or $TAIPAN_KERNELS)")
  if implementation == "auto":
    implementation = "pallas" if kernel_by_default else "reference"
  if implementation in ("reference", "interpret"):
    return implementation
  tiles = all(v is None or not v & (v - 1) for v in (head_dim, d_state))
  return "pallas_gpu" if jax.default_backend() == "gpu" and tiles else "reference"


def norm_matvec(x, norm_weight, w, *, eps: float | None = None, dtype, gate=None, group_size: int | None = None,
                residual=None, implementation: str = "auto"):
  """(residual +) RMSNorm(x [* silu(gate)]) @ w for one token per row.

  x: [batch, k]; gate: [batch, >= k] (its first k columns); norm_weight: [k], or None for a
  plain (optionally gated) product (eps: the norm's epsilon, needed only with a norm
  weight); w: [k, n], or a tuple of weights that share the
  normalised row (q, k and v; a SwiGLU's two up-projections), one kernel for all of them;
  residual: [batch, n] (one weight only).
  The normalised row is rounded to `dtype` and multiplied in `dtype`, as an nnx.Linear of
  that dtype does; group_size channels (default k) are normalised together.
  Returns [batch, n] in `dtype`, or fp32 with a residual; a tuple for a tuple of weights.
  """
  kw = dict(eps=eps, dtype=dtype, gate=gate, group_size=group_size, residual=residual)
  impl = resolve_decode_implementation(
      implementation, kernel_by_default=(x.shape[0] <= _BLOCK_KERNEL_MAX_BATCH
                                         and x.shape[1] <= _MATVEC_KERNEL_MAX_K))
  if impl == "reference":
    return norm_matvec_reference(x, norm_weight, w, **kw)
  from pallas_kernels.decode.norm_matvec import norm_matvec_gpu
  return norm_matvec_gpu(x, norm_weight, w, interpret=impl == "interpret", **kw)


def mamba2_decode_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                       *, heads: int, head_dim: int, n_groups: int, d_state: int,
                       implementation: str = "auto"):
  """A Mamba-2 mixer's token between its projections: causal conv over the cached inputs,
  softplus dt, SSD state update and y = S C + D x.

  zxbcdt: [batch, d_inner + conv_dim + heads] (z | x B C | dt); conv_state:
  [batch, d_conv - 1, conv_dim]; ssm_state: [batch, heads, head_dim, d_state] fp32.
  Returns (y [batch, d_inner] fp32, new conv_state, new ssm_state).
  """
  args = (zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D)
  kw = dict(heads=heads, head_dim=head_dim, n_groups=n_groups, d_state=d_state)
  impl = resolve_decode_implementation(
      implementation, head_dim=head_dim, d_state=d_state,
      kernel_by_default=zxbcdt.shape[0] <= _BLOCK_KERNEL_MAX_BATCH)
  if impl == "reference":
    return mamba2_step_reference(*args, **kw)
  from pallas_kernels.decode.mamba2_step import mamba2_step_gpu
  return mamba2_step_gpu(*args, interpret=impl == "interpret", **kw)
