"""flax.nnx modules of Taipan and its baselines; they call `taipan_jax.ops`, never kernels."""
from taipan_jax.models.attention import AttentionBlock, KVCache, apply_rope
from taipan_jax.models.build import build_model, count_params
from taipan_jax.models.lm import LanguageModel
from taipan_jax.models.mamba2 import Mamba2Block, Mamba2Cache, Mamba2Mixer
from taipan_jax.models.mlp import SwiGLU
from taipan_jax.models.norms import GatedRMSNorm, RMSNorm
from taipan_jax.models.sal import Gate, SALCache, SelectiveAttentionLayer

__all__ = ["build_model", "count_params", "LanguageModel", "Mamba2Mixer", "Mamba2Block",
           "Mamba2Cache", "SelectiveAttentionLayer", "SALCache", "Gate", "AttentionBlock", "KVCache",
           "apply_rope", "SwiGLU", "RMSNorm", "GatedRMSNorm"]
