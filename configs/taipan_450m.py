"""Taipan 450M: d_model 1024, 6 x (6 Mamba-2 + 1 SAL) (docs/spec.md section 6)."""
from taipan_jax.configs import base


def get_config():
  cfg = base.get_config()
  cfg.name = "taipan_450m"
  cfg.model.d_model = 1024
  cfg.model.pattern = "mmmmmms"
  cfg.model.num_units = 6
  cfg.train.steps = 190_700
  return cfg
