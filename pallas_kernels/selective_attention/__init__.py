"""Selective sliding-window attention kernels: only the selected query rows are computed.

`selective_attention_gpu`: query-compacted Pallas Triton forward and backward kernels (GPU, or
any backend with interpret=True). The reference is `taipan_jax.ops.selective_window_attention`.
"""
from pallas_kernels.selective_attention.gpu import (BlockSizes, compact_selection,
                                                    selective_attention_gpu)

__all__ = ["BlockSizes", "compact_selection", "selective_attention_gpu"]
