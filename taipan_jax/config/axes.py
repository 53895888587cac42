"""The axis names a config may use: the device mesh's axes (`mesh.*`) and the logical axes the
`sharding.rules` string maps onto them, with that string's parser. taipan_jax.sharding applies
the rules; the names live here, below it, so that validating a config needs nothing else.
"""
from __future__ import annotations

# Batch rows split over data and fsdp (fsdp also splits parameters), tensor splits heads and
# hidden widths, sequence splits the length (context parallelism).
MESH_AXES = ("data", "fsdp", "tensor", "sequence")

LOGICAL_AXES = ("batch", "length", "vocab", "embed", "heads", "mlp", "mamba_in",
                "mamba_inner", "mamba_conv", "mamba_heads", "conv_width", "norm", "gate_in",
                "gate_out")


class RulesError(ValueError):
  """A rule that names an unknown logical or mesh axis (the message says which)."""


def parse_rules(text: str) -> dict[str, tuple[str, ...]]:
  """'batch=data+fsdp, embed=fsdp, norm=' -> {'batch': ('data', 'fsdp'), 'embed': ('fsdp',),
  'norm': ()}."""
  rules = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, axes = item.partition("=")
    name = name.strip()
    if not sep or name not in LOGICAL_AXES:
      raise RulesError(f"config key sharding.rules: {item!r} is not 'logical=mesh[+mesh]' "
                       f"with a logical axis of {LOGICAL_AXES}; fix: e.g. 'embed=fsdp'")
    mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
    bad = [a for a in mesh_axes if a not in MESH_AXES]
    if bad:
      raise RulesError(f"config key sharding.rules: {item!r} names mesh axes {bad}; fix: use "
                       f"{MESH_AXES}")
    if name in rules:
      raise RulesError(f"config key sharding.rules: {name!r} has two rules; fix: keep one")
    rules[name] = mesh_axes
  return rules
