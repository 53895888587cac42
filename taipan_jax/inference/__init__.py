"""Inference: generation with a constant-size cache, and streaming long-context evaluation."""
from taipan_jax.inference.generate import GenerationError, Generator
from taipan_jax.inference.sampling import Sampling, sample_logits

__all__ = ["Generator", "GenerationError", "Sampling", "sample_logits"]
