"""The paper's optimizer recipe (docs/spec.md section 7, decision j) as an optax chain."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def weight_decay_mask(params):
  """Decay matrices only (decision j): not norms, biases, embeddings, A_log, D, dt_bias."""
  def decays(path, leaf):
    names = "/".join(str(getattr(p, "key", p)) for p in path)
    return leaf.ndim >= 2 and "embed" not in names
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup to optim.peak_lr, cosine decay to optim.final_lr at train.steps."""
  o = cfg.optim
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.peak_lr, warmup_steps=o.warmup_steps,
      decay_steps=max(cfg.train.steps, o.warmup_steps + 1), end_value=o.final_lr)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the schedule and masked weight decay."""
  o = cfg.optim
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  chain.append(optax.adamw(learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=weight_decay_mask))
  return optax.chain(*chain)


def forced_selection_rate(cfg, step):
  """The dense-to-sparse warm-up (sal.dense_warmup_steps = N > 0): the probability that a
  training step also selects a token its gate did not pick, falling linearly from 1 at step 0
  to 0 at step N. None when there is no warm-up (the paper's training), so that program is
  unchanged."""
  n = cfg.sal.dense_warmup_steps
  if not n:
    return None
  return jnp.maximum(1.0 - step / n, 0.0)


def gumbel_tau(cfg, step):
  """Constant tau, or a linear anneal to sal.tau_final over train.steps (decision c)."""
  if cfg.sal.tau_final is None:
    return cfg.sal.tau
  frac = jnp.minimum(step / max(cfg.train.steps, 1), 1.0)
  return cfg.sal.tau + (cfg.sal.tau_final - cfg.sal.tau) * frac
