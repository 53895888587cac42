"""Chunked SSD (Mamba-2) kernels: a TPU (Mosaic) forward kernel and the naive reference.

`ssd_forward_tpu` runs on TPU, or anywhere with `interpret=True` (Pallas TPU interpret mode).
`ssd_reference` is the sequential recurrence every implementation is tested against.
"""
from pallas_kernels.ssd.common import BlockSizes
from pallas_kernels.ssd.reference import ssd_reference
from pallas_kernels.ssd.tpu import ssd_forward_tpu

__all__ = ["BlockSizes", "ssd_forward_tpu", "ssd_reference"]
