"""Decode-step kernels (one token per row) and the plain references they are tested against.

`norm_matvec_gpu`: RMSNorm (optionally gated, grouped) then a matrix-vector product, with an
optional residual, one Pallas Triton kernel. A Mamba-2 mixer's token is two kernels:
`mamba2_in_proj_gpu` (norm, in-projection over its transposed weight and the causal
convolution, its cache shifted in place) and `mamba2_ssm_out_gpu` (softplus dt, state
update, y = S C + D x, gated norm and out-projection, the state in place).
`window_attention_gpu`: one query per row against a key/value cache (a SAL's ring buffer),
skipping rows whose output is not needed; `ring_attention_gpu` also appends the token to
the ring buffer first, in place. All run on
any backend with interpret=True. Inference-only: no gradients.
"""
from pallas_kernels.decode.mamba2_in_proj import mamba2_in_proj_gpu
from pallas_kernels.decode.mamba2_ssm_out import mamba2_ssm_out_gpu
from pallas_kernels.decode.norm_matvec import norm_matvec_gpu
from pallas_kernels.decode.reference import (mamba2_in_proj_reference, mamba2_ssm_out_reference,
                                             norm_matvec_reference, window_attention_reference)
from pallas_kernels.decode.window_attention import window_attention_gpu

__all__ = ["mamba2_in_proj_gpu", "mamba2_in_proj_reference", "mamba2_ssm_out_gpu",
           "mamba2_ssm_out_reference", "norm_matvec_gpu", "norm_matvec_reference",
           "window_attention_gpu", "window_attention_reference"]
