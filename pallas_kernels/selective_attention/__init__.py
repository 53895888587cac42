"""Selective sliding-window attention kernels: only the selected query rows are computed.

`selective_attention_gpu`: query-compacted Pallas Triton forward and backward kernels (GPU, or
any backend with interpret=True). `selective_attention_tpu`: the same algorithm on Mosaic
(TPU, or any backend in TPU interpret mode). `selective_attention_reference`: the dense masked
softmax both are tested against.
"""
from pallas_kernels.selective_attention.common import BlockSizes, Tile, compact_selection
from pallas_kernels.selective_attention.gpu import selective_attention_gpu
from pallas_kernels.selective_attention.reference import selective_attention_reference
from pallas_kernels.selective_attention.tpu import selective_attention_tpu

__all__ = ["BlockSizes", "Tile", "compact_selection", "selective_attention_gpu",
           "selective_attention_reference", "selective_attention_tpu"]
