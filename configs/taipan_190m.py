"""Taipan 190M: d_model 768, 3 x (6 Mamba-2 + 1 SAL), Llama-3 vocabulary (docs/spec.md section 6)."""
from taipan_jax.configs import base


def get_config():
  cfg = base.get_config()
  cfg.name = "taipan_190m"
  cfg.model.d_model = 768
  cfg.model.pattern = "mmmmmms"
  cfg.model.num_units = 3
  return cfg
