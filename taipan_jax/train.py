r"""Train a model from a config on the embedded MQAR task.

    python -m taipan_jax.train --config=configs/tiny.py --config.train.steps=300

The step is a plain jitted function of (params, opt_state, batch, key); the model is
split into its graph definition and parameters once, and merged inside the step.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from absl import app
from flax import nnx
from ml_collections import config_flags

import taipan_jax
from taipan_jax.config import validate
from taipan_jax.data import mqar_batch
from taipan_jax import configs as _configs

_DEFAULT_CONFIG = os.path.join(os.path.dirname(_configs.__file__), "tiny.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG,
                                          "Path to a config file with get_config().")


def weight_decay_mask(params):
  """Decay matrices only (decision j): not norms, biases, embeddings, A_log, D, dt_bias."""
  def decays(path, leaf):
    names = "/".join(str(getattr(p, "key", p)) for p in path)
    return leaf.ndim >= 2 and "embed" not in names
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  o = cfg.optim
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.peak_lr, warmup_steps=o.warmup_steps,
      decay_steps=max(total_steps, o.warmup_steps + 1), end_value=o.final_lr)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=weight_decay_mask))
  return optax.chain(*chain)


def gumbel_tau(cfg, step, total_steps):
  """Constant tau, or a linear anneal to sal.tau_final (decision c)."""
  if cfg.sal.tau_final is None:
    return cfg.sal.tau
  frac = jnp.minimum(step / max(total_steps, 1), 1.0)
  return cfg.sal.tau + (cfg.sal.tau_final - cfg.sal.tau) * frac


def masked_metrics(logits, batch):
  """Cross-entropy and accuracy over the positions where loss_mask holds."""
  mask = batch["loss_mask"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  denom = jnp.maximum(mask.sum(), 1.0)
  acc = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return (ce * mask).sum() / denom, (acc * mask).sum() / denom


class Trainer(NamedTuple):
  """Everything the loop needs: initial state and the two compiled steps."""
  params: Any
  opt_state: Any
  train_step: Callable     # (params, opt_state, step) -> (params, opt_state, metrics)
  eval_step: Callable      # params -> metrics on a fixed held-out batch


def make_trainer(cfg) -> Trainer:
  """Builds the model and optimizer of a validated config and jits its steps."""
  steps, t = cfg.train.steps, cfg.train
  data_kw = dict(batch_size=t.batch_size, seq_len=cfg.data.seq_len,
                 num_kv_pairs=cfg.data.num_kv_pairs, vocab_size=cfg.model.vocab_size)
  model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=t.seed, gumbel=t.seed + 1))
  train_def, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  eval_def = nnx.graphdef(model)
  tx = make_optimizer(cfg, steps)

  def loss_fn(params, batch, key, step):
    m = nnx.merge(train_def, params, rest)
    logits, aux = m(batch["tokens"], gumbel_key=key, tau=gumbel_tau(cfg, step, steps))
    ce, acc = masked_metrics(logits, batch)
    loss = ce + cfg.loss.budget_weight * aux["budget_loss"]
    return loss, {"loss": loss, "ce": ce, "accuracy": acc, "budget_loss": aux["budget_loss"],
                  "selected": jnp.mean(aux["selected_fraction"])}

  @jax.jit
  def train_step(params, opt_state, step):
    # Data and Gumbel noise are functions of (seed, step): a rerun sees the same stream.
    key = jax.random.fold_in(jax.random.key(t.seed), step)
    data_key, gumbel_key = jax.random.split(key)
    batch = mqar_batch(data_key, **data_kw)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch, gumbel_key, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2)
                                        for g in jax.tree.leaves(grads)))
    return optax.apply_updates(params, updates), opt_state, metrics

  @jax.jit
  def eval_step(params):
    batch = mqar_batch(jax.random.key(t.seed + 12345), **data_kw)
    logits, aux = nnx.merge(eval_def, params, rest)(batch["tokens"])
    ce, acc = masked_metrics(logits, batch)
    return {"eval_ce": ce, "eval_accuracy": acc,
            "eval_selected": jnp.mean(aux["selected_fraction"])}

  return Trainer(params, tx.init(params), train_step, eval_step)


def train(cfg, *, log: Callable[[str], None] = print) -> list[dict]:
  """Trains a validated config's model on MQAR; returns the logged metrics."""
  steps, t = cfg.train.steps, cfg.train
  trainer = make_trainer(cfg)
  params, opt_state = trainer.params, trainer.opt_state
  n_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  log(f"{cfg.name}: {n_params:,} parameters, pattern {cfg.model.pattern} "
      f"x {cfg.model.num_units}, MQAR {cfg.data.num_kv_pairs} pairs in {cfg.data.seq_len} "
      f"tokens (recall without memory: {1 / cfg.data.num_kv_pairs:.3f}), {steps} steps, "
      f"jax {jax.__version__} on {jax.devices()[0].platform}")
  history = []
  start = time.perf_counter()
  tokens_per_step = t.batch_size * cfg.data.seq_len
  for step in range(steps):
    params, opt_state, metrics = trainer.train_step(params, opt_state, jnp.int32(step))
    if step == 0 or (step + 1) % t.log_every == 0 or step + 1 == steps:
      row = {k: float(v) for k, v in {**metrics, **trainer.eval_step(params)}.items()}
      elapsed = time.perf_counter() - start
      row.update(step=step + 1, seconds=elapsed)
      history.append(row)
      rate = (step + 1) * tokens_per_step / elapsed
      eta = elapsed / (step + 1) * (steps - step - 1)
      log(f"step {step + 1:6d}/{steps}  loss {row['loss']:.4f}  ce {row['ce']:.4f}  "
          f"acc {row['accuracy']:.3f}  eval_acc {row['eval_accuracy']:.3f}  "
          f"selected {row['selected']:.3f}/{row['eval_selected']:.3f}  "
          f"{rate:,.0f} tok/s  eta {eta:.0f}s")
  return history


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train(validate(_CONFIG.value))   # config_flags loads and overrides; we validate once


if __name__ == "__main__":
  app.run(main)
