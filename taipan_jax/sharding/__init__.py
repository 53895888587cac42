"""Device meshes, logical-axis sharding rules and context parallelism (MaxText style).

A config names the mesh (`mesh.*`: data, fsdp, tensor, sequence) and the rules mapping the
logical axis names of parameters and activations onto it (`sharding.rules`). The model code
names logical axes only; changing parallelism means editing rules, never model code.
"""
from taipan_jax.sharding.mesh import MESH_AXES, make_mesh, mesh_shape
from taipan_jax.sharding.rules import (Rules, constrain, logical_spec, param_logical_axes,
                                       parse_rules, shard_count, tree_shardings, use_rules,
                                       with_axes)

__all__ = ["MESH_AXES", "Rules", "constrain", "logical_spec", "make_mesh", "mesh_shape",
           "param_logical_axes", "parse_rules", "shard_count", "tree_shardings", "use_rules",
           "with_axes"]
