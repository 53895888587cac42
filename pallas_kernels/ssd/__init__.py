"""Chunked SSD (Mamba-2) kernels and the plain reference they are tested against.

`ssd_gpu`: Pallas Triton forward and backward kernels (differentiable; GPU, or any backend
with interpret=True). `ssd_tpu`: the Pallas TPU (Mosaic) forward and backward kernels (TPU,
or any backend in TPU interpret mode). `ssd_reference`: the sequential recurrence.
"""
from pallas_kernels.ssd.common import BlockSizes
from pallas_kernels.ssd.gpu import ssd_backward_gpu, ssd_forward_gpu, ssd_gpu
from pallas_kernels.ssd.reference import ssd_reference
from pallas_kernels.ssd.tpu import ssd_backward_tpu, ssd_forward_tpu, ssd_tpu

__all__ = ["BlockSizes", "ssd_backward_gpu", "ssd_backward_tpu", "ssd_forward_gpu",
           "ssd_forward_tpu", "ssd_gpu", "ssd_reference", "ssd_tpu"]
