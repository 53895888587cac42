"""Pretrained Mamba-2 weights in, and Taipans grown from them."""
from taipan_jax.interop.hf_mamba2 import (InteropError, config_from_hf, load_hf_mamba2,
                                          read_checkpoint)
from taipan_jax.interop.upcycle import upcycle_to_taipan

__all__ = ["InteropError", "config_from_hf", "load_hf_mamba2", "read_checkpoint",
           "upcycle_to_taipan"]
