"""SWA-only hybrid at 190M: Taipan's layout with every token selected and no budget loss
(the baseline the paper's reviewers asked for)."""
from taipan_jax.configs import taipan_190m


def get_config():
  cfg = taipan_190m.get_config()
  cfg.name = "swa_hybrid_190m"
  cfg.sal.selection = "all"
  cfg.loss.budget_weight = 0.0
  return cfg
