"""Grow a Taipan from a pretrained Mamba-2: its blocks kept, a fresh SAL after every K.

The new SALs start as near-identities, so the upcycled model's logits at step 0 are the
source model's up to what a closed gate lets through:
  - the gate starts closed: zero weights and bias [0, logit(closed_fraction)], so a token is
    selected with probability closed_fraction (1e-3) in training and in evaluation alike, and
    a selected token moves only alpha = closed_fraction of the way to its attention output
    (eq. 5); every other token is left untouched;
  - the SwiGLU's output projection starts at zero, so eq. 6 adds nothing.
Training opens the gate: the budget loss pulls the selected fraction towards C, and the
straight-through gradient reaches the gate through alpha*(o - h) even where m = 0.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from taipan_jax.config import load_config
from taipan_jax.interop.hf_mamba2 import InteropError
from taipan_jax.models import build_model


def upcycle_to_taipan(source_model, source_cfg, *, sal_every: int, overrides=None,
                      closed_fraction: float = 1e-3, seed: int = 0):
  """(Mamba-2 model, its config) -> (Taipan model, config): pattern 'm'*K + 's'.

  overrides: dotted config keys for the new model (e.g. {"sal.window": 1024}); the Mamba-2,
  embedding and vocabulary fields are the source's.
  """
  n = len(source_cfg.model.pattern * source_cfg.model.num_units)
  if set(source_cfg.model.pattern) != {"m"}:
    raise InteropError(f"model.pattern={source_cfg.model.pattern!r}: the source must be "
                       "Mamba-2 blocks only; fix: upcycle a Mamba-2 checkpoint")
  if sal_every < 1 or n % sal_every:
    raise InteropError(f"sal_every={sal_every} does not divide the source's {n} Mamba-2 "
                       f"blocks; fix: pick a divisor of {n} (the paper uses 6)")
  cfg_dict = source_cfg.to_dict()
  cfg = load_config("base")
  over = {f"{section}.{k}": v for section in ("model", "mamba")
          for k, v in cfg_dict[section].items()}
  over.update({"name": f"{source_cfg.name}_taipan{sal_every}",
               "model.pattern": "m" * sal_every + "s", "model.num_units": n // sal_every,
               **(overrides or {})})
  cfg = load_config("base", over)
  model = build_model(cfg, rngs=nnx.Rngs(params=seed, gumbel=seed + 1))

  src = dict(nnx.to_flat_state(nnx.state(source_model, nnx.Param)))
  dst = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in src.items():
    if path[0] == "layers":
      i = path[1]
      new_path = ("layers", i + i // sal_every, *path[2:])   # one SAL after every K blocks
    else:
      new_path = path
    if new_path not in dst or dst[new_path][...].shape != var[...].shape:
      raise InteropError(f"source parameter {'.'.join(map(str, path))} has no match in the "
                         "upcycled model; fix: report this as a bug")
    dst[new_path][...] = var[...]
  logit = math.log(closed_fraction / (1.0 - closed_fraction))
  for path, var in dst.items():
    if path[0] != "layers" or cfg.model.pattern[path[1] % (sal_every + 1)] != "s":
      continue
    if path[2:] in (("gate", "out", "kernel"), ("mlp", "w2", "kernel")):
      var[...] = jnp.zeros_like(var[...])
    elif path[2:] == ("gate", "out", "bias"):
      var[...] = jnp.asarray([0.0, logit], var[...].dtype)
  nnx.update(model, nnx.from_flat_state(dst))
  return model, cfg
