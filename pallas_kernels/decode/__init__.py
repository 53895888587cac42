"""Decode-step kernels (one token per row) and the plain references they are tested against.

`norm_matvec_gpu`: RMSNorm (optionally gated, grouped) then a matrix-vector product, with an
optional residual, one Pallas Triton kernel. `mamba2_step_gpu`: a Mamba-2 mixer's token
between its projections (convolution, softplus dt, state update, y = S C + D x).
`window_attention_gpu`: one query per row against a key/value cache (a SAL's ring buffer),
skipping rows whose output is not needed. All run on any backend with interpret=True.
Inference-only: no gradients.
"""
from pallas_kernels.decode.mamba2_step import mamba2_step_gpu
from pallas_kernels.decode.norm_matvec import norm_matvec_gpu
from pallas_kernels.decode.reference import (mamba2_step_reference, norm_matvec_reference,
                                             window_attention_reference)
from pallas_kernels.decode.window_attention import window_attention_gpu

__all__ = ["mamba2_step_gpu", "mamba2_step_reference", "norm_matvec_gpu",
           "norm_matvec_reference", "window_attention_gpu", "window_attention_reference"]
