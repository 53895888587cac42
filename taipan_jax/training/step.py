"""The jitted train and eval steps: plain functions of (state, batch).

A batch is the data pipeline's dict of [batch, seq] arrays (see taipan_jax.data.pipeline).
Gradient accumulation runs inside the step as a scan over micro-batches, so one step is one
compiled program whatever the accumulation count.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from taipan_jax.sharding.context_parallel import over_sequence
from taipan_jax.training.optimizer import (forced_selection_rate, gumbel_tau,
                                           learning_rate_schedule, make_optimizer)
from taipan_jax.training.state import TrainState


class Steps(NamedTuple):
  init_state: Callable[[], TrainState]   # pure: jit it with out_shardings to build sharded
  abstract_state: TrainState             # shapes and dtypes of init_state(), no memory
  train_step: Callable      # (state, batch) -> (state, metrics)
  eval_step: Callable       # (params, batch) -> sums: ce, weight, correct, selected


def _token_sums(logits, batch):
  """Summed cross-entropy, loss weight and correct predictions over weighted targets."""
  w = batch["loss_mask"]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return (ce * w).sum(), w.sum(), (correct * w).sum()


def make_steps(cfg, build: Callable[[], nnx.Module]) -> Steps:
  """The train and eval steps of the model `build()` makes, and its state's initializer.

  The model is only traced here (nnx.eval_shape): parameters come into being inside
  `init_state`, which the trainer jits with the state's shardings, so no full copy of them
  is ever made on one device. The non-parameter state (the Gumbel stream's key) is a few
  bytes and is made concretely.
  """
  accum = cfg.train.grad_accum_steps
  packed = cfg.data.task == "text"       # only packed text carries document boundaries
  model = nnx.eval_shape(build)
  train_def = nnx.graphdef(model)
  model.eval()
  eval_def = nnx.graphdef(model)
  rest = jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2])()
  tx = make_optimizer(cfg)
  schedule = learning_rate_schedule(cfg)
  base_key = jax.random.key(cfg.train.seed + 1)

  # The LM head and its loss in one chunked pass (ops.linear_cross_entropy) unless
  # loss.ce_chunk is 0; context parallelism keeps the logits, split over the sequence axis.
  fused_head = cfg.loss.ce_chunk > 0 and cfg.mesh.sequence == 1

  def forward(graphdef, params, batch, **kw):
    """-> (summed ce, weight, correct), aux over the batch's weighted targets."""
    def call(params, tokens, seg, kw):
      return nnx.merge(graphdef, params, rest)(
          tokens, token_mask=seg > 0, segment_ids=seg if packed else None,
          return_hidden=fused_head, **kw)

    if cfg.mesh.sequence > 1:      # context parallelism: the length over the sequence axis
      call = over_sequence(call)
    out, aux = call(params, batch["tokens"], batch["segment_ids"], kw)
    if not fused_head:
      return _token_sums(out, batch), aux
    ce_sum, correct = nnx.merge(graphdef, params, rest).cross_entropy_sums(
        out, batch["targets"], batch["loss_mask"], chunk=cfg.loss.ce_chunk)
    return (ce_sum, batch["loss_mask"].sum(), correct), aux

  def micro_loss(params, micro, key, tau, forced_rate, total_weight):
    (ce_sum, weight, correct), aux = forward(train_def, params, micro, gumbel_key=key, tau=tau,
                                             forced_rate=forced_rate)
    # Normalised by the whole batch's weight: the micro-batch gradients sum to the gradient
    # of the full batch's mean loss.
    loss = ce_sum / total_weight + cfg.loss.budget_weight * aux["budget_loss"] / accum
    return loss, {"ce_sum": ce_sum, "weight": weight, "correct": correct,
                  "budget_loss": aux["budget_loss"] / accum,
                  "selected": jnp.mean(aux["selected_fraction"], axis=-1) / accum}

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(base_key, state.step)
    tau = gumbel_tau(cfg, state.step)
    forced_rate = forced_selection_rate(cfg, state.step)
    total_weight = jnp.maximum(batch["loss_mask"].sum(), 1.0)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    grad_fn = jax.grad(micro_loss, has_aux=True)

    def body(carry, inputs):
      grads, sums = carry
      i, mb = inputs
      g, m = grad_fn(state.params, mb, jax.random.fold_in(key, i), tau, forced_rate,
                     total_weight)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, m)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    _, sums0 = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), key,
                              tau, forced_rate, total_weight)
    sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums0)
    (grads, sums), _ = jax.lax.scan(body, (zeros, sums0), (jnp.arange(accum), micro))

    ce = sums["ce_sum"] / total_weight
    loss = ce + cfg.loss.budget_weight * sums["budget_loss"]
    grad_norm = optax.tree_utils.tree_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite loss or gradient is not applied: parameters and optimizer moments keep
    # their values and the batch is skipped (optax.apply_if_finite checks only the updates).
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_run=jnp.where(ok, 0, state.nonfinite_run + 1),
        nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
    metrics = {"loss": loss, "ce": ce, "budget_loss": sums["budget_loss"],
               "accuracy": sums["correct"] / total_weight, "grad_norm": grad_norm,
               "lr": schedule(state.step), "selected": sums["selected"],
               "tokens": sums["weight"], "finite": ok,
               "nonfinite_run": new_state.nonfinite_run,
               "nonfinite_total": new_state.nonfinite_total}
    return new_state, metrics

  def eval_step(params, batch):
    (ce_sum, weight, correct), aux = forward(eval_def, params, batch)
    return {"ce_sum": ce_sum, "weight": weight, "correct": correct,
            "selected": jnp.mean(aux["selected_fraction"], axis=-1)}

  def init_state():
    return TrainState.create(nnx.state(build(), nnx.Param), tx)

  return Steps(init_state=init_state, abstract_state=jax.eval_shape(init_state),
               train_step=train_step, eval_step=eval_step)
