"""Logical axis names for every parameter and key activation, and the rules that map them
onto mesh axes.

Rules are data: `sharding.rules` in the config, e.g.
  "batch=data+fsdp, vocab=tensor, embed=fsdp, heads=tensor, mlp=tensor, mamba_inner=tensor,
   length=sequence"
A logical name without a rule is replicated. A dimension that its mesh axes do not divide is
replicated too (a 2-head vector is not split 4 ways).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from taipan_jax.config.axes import LOGICAL_AXES, RulesError, parse_rules

Rules = Mapping[str, tuple[str, ...]]
__all__ = ["LOGICAL_AXES", "Rules", "RulesError", "constrain", "logical_spec",
           "param_logical_axes", "parse_rules", "shard_count", "tree_shardings", "use_rules"]


def shard_count(sharding: NamedSharding, dim: int | None = None) -> int:
  """How many ways `sharding` splits dimension `dim` (None: the whole array)."""
  entries = sharding.spec if dim is None else sharding.spec[dim:dim + 1]
  return math.prod(sharding.mesh.shape[a] for entry in entries if entry
                   for a in ((entry,) if isinstance(entry, str) else entry))


def logical_spec(names, rules: Rules, mesh, shape=None) -> P:
  """PartitionSpec for logical `names` (None: replicated dim). Mesh axes of size 1 are left
  out; a mesh axis is used at most once (the first dimension that asks for it); dims the
  mesh axes do not divide stay whole."""
  used = set()
  spec = []
  for i, name in enumerate(names):
    axes = tuple(a for a in rules.get(name, ()) if mesh.shape.get(a, 1) > 1 and a not in used) \
        if name else ()
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or (shape is not None and shape[i] % size):
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


# (module name, parameter name) -> logical axes; module None matches any module.
_PARAM_AXES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "heads"),
    ("k_proj", "kernel"): ("embed", "heads"),
    ("v_proj", "kernel"): ("embed", "heads"),
    ("o_proj", "kernel"): ("heads", "embed"),
    ("w1", "kernel"): ("embed", "mlp"),
    ("w3", "kernel"): ("embed", "mlp"),
    ("w2", "kernel"): ("mlp", "embed"),
    # in_proj packs [z, x, B, C, dt] in one matrix: splitting its columns would cut across
    # the parts, so it has an axis of its own (replicated by the default rules).
    ("in_proj", "kernel"): ("embed", "mamba_in"),
    ("out_proj", "kernel"): ("mamba_inner", "embed"),
    (None, "conv_weight"): ("conv_width", "mamba_conv"),
    (None, "conv_bias"): ("mamba_conv",),
    (None, "A_log"): ("mamba_heads",),
    (None, "D"): ("mamba_heads",),
    (None, "dt_bias"): ("mamba_heads",),
    ("hidden", "kernel"): ("gate_in", "gate_out"),
    ("hidden", "bias"): ("gate_out",),
    ("out", "kernel"): ("gate_in", "gate_out"),
    ("out", "bias"): ("gate_out",),
}


def _keys(path) -> list[str]:
  out = []
  for p in path:
    k = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
    if isinstance(k, str) and not k.startswith(".") and k != "value":
      out.append(k)
  return out


def param_logical_axes(path, ndim: int) -> tuple[str | None, ...]:
  """Logical axes of the parameter at `path` (a pytree key path of the model's nnx.State,
  or of an optimizer state that mirrors it). Raises for a parameter no rule names."""
  keys = _keys(path)
  if len(keys) >= 2:
    module, name = keys[-2], keys[-1]
    if name == "weight":                 # RMSNorm scales: the Mamba gated norm is d_inner
      axes = ("mamba_inner",) if module == "norm" and len(keys) >= 3 and \
          keys[-3] == "mixer" else ("norm",)
    else:
      axes = _PARAM_AXES.get((module, name)) or _PARAM_AXES.get((None, name))
    if axes is not None and len(axes) == ndim:
      return axes
  raise RulesError(f"parameter {'/'.join(keys)} (rank {ndim}) has no logical axes; fix: add "
                   "it to taipan_jax/sharding/rules.py _PARAM_AXES")


def tree_shardings(tree, mesh, rules: Rules):
  """NamedShardings for a state pytree (params, optimizer state, step counters): scalars
  replicated, every array by its parameter's logical axes."""
  def one(path, leaf):
    if not getattr(leaf, "shape", ()):
      return NamedSharding(mesh, P())
    axes = param_logical_axes(path, len(leaf.shape))
    return NamedSharding(mesh, logical_spec(axes, rules, mesh, leaf.shape))
  return jax.tree_util.tree_map_with_path(one, tree)


_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar(
    "taipan_sharding_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Rules):
  """Activation constraints (`constrain`) follow these rules while tracing inside."""
  token = _ACTIVE_RULES.set(rules)
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)


def constrain(x, names):
  """x with its logical axes `names` pinned to the mesh by the active rules; x unchanged
  without rules, without a mesh, or inside shard_map (manual axes)."""
  rules = _ACTIVE_RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty or any(
      t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names, rules, mesh, x.shape))
