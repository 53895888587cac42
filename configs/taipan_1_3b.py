"""Taipan 1.3B: d_model 2048, 5 x (6 Mamba-2 + 1 SAL) (docs/spec.md section 6)."""
from taipan_jax.configs import base


def get_config():
  cfg = base.get_config()
  cfg.name = "taipan_1_3b"
  cfg.model.d_model = 2048
  cfg.model.pattern = "mmmmmms"
  cfg.model.num_units = 5
  cfg.train.steps = 190_700
  return cfg
