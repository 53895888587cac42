"""Transformer++ baseline at 1.3B: 20 LLaMA blocks (RoPE, SwiGLU, RMSNorm, full attention)."""
from taipan_jax.configs import taipan_1_3b


def get_config():
  cfg = taipan_1_3b.get_config()
  cfg.name = "transformer_1_3b"
  cfg.model.pattern = "a"
  cfg.model.num_units = 20
  cfg.loss.budget_weight = 0.0
  return cfg
