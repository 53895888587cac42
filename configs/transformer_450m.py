"""Transformer++ baseline at 450M: 24 LLaMA blocks (RoPE, SwiGLU, RMSNorm, full attention)."""
from taipan_jax.configs import taipan_450m


def get_config():
  cfg = taipan_450m.get_config()
  cfg.name = "transformer_450m"
  cfg.model.pattern = "a"
  cfg.model.num_units = 24
  cfg.loss.budget_weight = 0.0
  return cfg
