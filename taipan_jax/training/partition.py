"""How a training run lays its state and batches over the devices: the mesh from
`cfg.mesh`, the shardings from `cfg.sharding.rules`, and the steps jitted with them."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from taipan_jax.sharding import (logical_spec, make_mesh, parse_rules, shard_count,
                                 tree_shardings, use_rules)
from taipan_jax.sharding.mesh import MeshError


class PartitionError(ValueError):
  """The run's batch or mesh does not fit the devices (the message names the fix)."""


class Plan(NamedTuple):
  mesh: jax.sharding.Mesh
  rules: dict
  state: Any                 # NamedShardings, a pytree like the TrainState
  batch: NamedSharding       # [batch, seq] arrays of a batch dict
  replicated: NamedSharding


def make_plan(cfg, abstract_state, devices=None) -> Plan:
  try:
    mesh = make_mesh(cfg.mesh, devices)
  except MeshError as e:
    raise PartitionError(str(e)) from None
  rules = parse_rules(cfg.sharding.rules)
  batch = NamedSharding(mesh, logical_spec(("batch", "length"), rules, mesh))
  shards = shard_count(batch, 0)
  if cfg.train.batch_size % shards or cfg.train.batch_size % jax.process_count():
    raise PartitionError(
        f"train.batch_size={cfg.train.batch_size} does not split over the {shards} batch "
        f"shards of mesh {dict(mesh.shape)} and {jax.process_count()} process(es); fix: use a "
        f"multiple of {math.lcm(shards, jax.process_count())}")
  return Plan(mesh, rules, tree_shardings(abstract_state, mesh, rules), batch,
              NamedSharding(mesh, P()))


def _traced_under(plan: Plan, jitted):
  """Calls `jitted` with the mesh and rules set, so that kernels split per shard (XLA
  cannot partition a Pallas call) and activation constraints follow the rules."""
  def call(*args):
    with jax.set_mesh(plan.mesh), use_rules(plan.rules):
      return jitted(*args)
  return call


def init_state(steps, plan: Plan):
  """The TrainState created directly in its shardings: each device makes only its part."""
  return _traced_under(plan, jax.jit(steps.init_state, out_shardings=plan.state))()


def _train_step_jit(steps, plan: Plan):
  return jax.jit(steps.train_step, in_shardings=(plan.state, plan.batch),
                 out_shardings=(plan.state, plan.replicated), donate_argnums=0)


def jit_train_step(steps, plan: Plan):
  return _traced_under(plan, _train_step_jit(steps, plan))


def lower_train_step(steps, plan: Plan, abstract_batch):
  """The train step lowered for abstract inputs (compile it for XLA's memory analysis)."""
  return _traced_under(plan, _train_step_jit(steps, plan).lower)(steps.abstract_state,
                                                                 abstract_batch)


def lower_eval_step(steps, plan: Plan, abstract_batch):
  """The eval step lowered for abstract inputs (as lower_train_step)."""
  jitted = jax.jit(steps.eval_step, in_shardings=(plan.state.params, plan.batch),
                   out_shardings=plan.replicated)
  return _traced_under(plan, jitted.lower)(steps.abstract_state.params, abstract_batch)


def jit_eval_step(steps, plan: Plan):
  return _traced_under(plan, jax.jit(steps.eval_step,
                                     in_shardings=(plan.state.params, plan.batch),
                                     out_shardings=plan.replicated))
