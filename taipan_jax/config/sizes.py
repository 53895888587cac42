"""Sizes derived from a validated config."""
from __future__ import annotations

import math


def padded_vocab_size(cfg) -> int:
  k = cfg.model.pad_vocab_multiple
  return -(-cfg.model.vocab_size // k) * k


def mlp_hidden_size(cfg) -> int:
  """SwiGLU width: the configured value, or 8/3*d_model rounded up to 128 (decision f)."""
  if cfg.model.mlp_hidden:
    return cfg.model.mlp_hidden
  return int(math.ceil(8 * cfg.model.d_model / 3 / 128) * 128)


def layer_kinds(cfg) -> str:
  """The full layer sequence, one character per layer, e.g. 'mmmmmmsmmmmmms...'."""
  return cfg.model.pattern * cfg.model.num_units


def residual_branches(cfg) -> int:
  """Residual branches in the whole model: 1 per Mamba-2 block, 2 per SAL / attention block."""
  return sum(1 if kind == "m" else 2 for kind in layer_kinds(cfg))
