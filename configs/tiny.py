"""Tiny Taipan for CPU demos and tests: d_model 64, 2 x (2 Mamba-2 + 1 SAL), MQAR task.

About 2.5 minutes on a 2-core CPU for 1000 steps; held-out recall rises past the no-memory
level of 0.25 (0.86 at step 1000 from the README command on a 2-core CPU, jax 0.10.2).
"""
from taipan_jax.configs import base


def get_config():
  cfg = base.get_config()
  cfg.name = "tiny"
  cfg.model.vocab_size = 32
  cfg.model.d_model = 64
  cfg.model.pattern = "mms"
  cfg.model.num_units = 2
  cfg.mamba.d_state = 16
  cfg.mamba.head_dim = 64
  cfg.mamba.chunk_size = 16
  cfg.sal.head_dim = 32
  cfg.sal.window = 64
  cfg.sal.capacity = 0.5       # MQAR: about half of the tokens are keys that need recall
  cfg.attention.head_dim = 32
  cfg.attention.max_cache_len = 256
  cfg.optim.peak_lr = 6e-3
  cfg.optim.final_lr = 1e-4
  cfg.optim.warmup_steps = 50
  cfg.optim.weight_decay = 0.01
  cfg.train.steps = 1000
  cfg.train.batch_size = 64
  cfg.train.log_every = 100
  cfg.train.eval_every = 250
  # A checkpoint every ~15 s of the README run on a 2-core CPU: Ctrl-C or a crash loses
  # less than a minute.
  cfg.train.checkpoint_every = 100
  # 4 pairs in 32 tokens: an H100 sweep (docs/decisions.md) showed this setting crosses
  # from "guess a value seen in context" (accuracy 1/4) to real recall in ~500-600 steps.
  cfg.data.seq_len = 32
  cfg.data.num_kv_pairs = 4
  return cfg
