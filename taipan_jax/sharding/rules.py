"""The rules that map logical axis names onto mesh axes, and their use: the shardings of a
state pytree and the constraints on activations.

Parameters carry their logical axes from where models/ creates them (`with_axes`, nnx
metadata, as MaxText and the Flax Gemma models do); activations name theirs at `constrain`.

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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from taipan_jax.config.axes import LOGICAL_AXES, RulesError, parse_rules

Rules = Mapping[str, tuple[str, ...]]
__all__ = ["AXES_METADATA", "LOGICAL_AXES", "Rules", "RulesError", "constrain", "logical_spec",
           "param_logical_axes", "parse_rules", "shard_count", "tree_shardings", "use_rules",
           "with_axes"]


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


# The nnx metadata key under which a parameter carries its logical axes (models/ sets it
# where it creates the parameter: `with_axes`).
AXES_METADATA = "logical_axes"


def with_axes(*names: str | None) -> dict:
  """The metadata of a parameter whose dimensions have these logical axes, for nnx.Param(...,
  **with_axes(...)) or nnx.Linear's kernel_metadata / bias_metadata."""
  return {AXES_METADATA: tuple(names)}


def param_logical_axes(variable, where: str = "") -> tuple[str | None, ...]:
  """The logical axes a parameter (an nnx.Variable, or the same node of an optimizer state
  that mirrors the parameters) was created with. Raises for one created without."""
  axes = variable.get_metadata().get(AXES_METADATA)
  ndim = len(jax.tree.leaves(variable)[0].shape)
  if axes is None or len(axes) != ndim:
    raise RulesError(f"parameter {where or type(variable).__name__} (rank {ndim}) has logical "
                     f"axes {axes}; fix: pass with_axes(...) with {ndim} names where "
                     "taipan_jax/models creates it")
  return axes


def tree_shardings(tree, mesh, rules: Rules):
  """NamedShardings for a state pytree (params, optimizer state, step counters): every
  parameter by the logical axes it carries, scalars replicated."""
  def one(path, leaf):
    if isinstance(leaf, nnx.Variable):
      where = jax.tree_util.keystr(path)
      axes = param_logical_axes(leaf, where)
      return jax.tree.map(lambda a: NamedSharding(mesh, logical_spec(axes, rules, mesh, a.shape)),
                          leaf)
    if getattr(leaf, "shape", ()):
      raise RulesError(f"array at {jax.tree_util.keystr(path)} {leaf.shape} is no parameter "
                       "and has no logical axes; fix: keep arrays of the state in nnx.Params")
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(one, tree,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


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
