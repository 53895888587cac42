"""Transformer++ baseline at 190M: 12 LLaMA blocks (RoPE, SwiGLU, RMSNorm, full attention)."""
from taipan_jax.configs import base


def get_config():
  cfg = base.get_config()
  cfg.name = "transformer_190m"
  cfg.model.d_model = 768
  cfg.model.pattern = "a"
  cfg.model.num_units = 12
  cfg.loss.budget_weight = 0.0
  return cfg
