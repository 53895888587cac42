"""Hugging Face `Mamba2ForCausalLM` and state-spaces/mamba Mamba-2 checkpoints -> our model.

Reads `config.json` and the weights (`model.safetensors`, sharded safetensors with an index,
or `pytorch_model.bin` when torch is installed), maps every tensor onto the parameters of a
`LanguageModel` of Mamba-2 blocks, and refuses, naming it, any tensor left over, any missing
and any shape that does not fit. No torch is needed for safetensors.

Both layouts are mamba_ssm's: in_proj splits as z | x B C | dt, the depthwise conv is
[conv_dim, 1, kernel], the gated RMSNorm normalises groups of d_inner / n_groups channels.
"""
from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from taipan_jax.config import load_config, padded_vocab_size
from taipan_jax.models import build_model


class InteropError(ValueError):
  """A checkpoint we cannot load as it is; the message names the tensor or key and the fix."""


def read_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """A checkpoint directory -> (its config.json as a dict, {tensor name: float32 array})."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise InteropError(f"{path!r} holds no config.json; fix: point at a directory written by "
                       "save_pretrained or a state-spaces/mamba2-* snapshot")
  with open(config_path) as f:
    hf_config = json.load(f)
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  torch_bin = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(index) or os.path.isfile(single):
    from safetensors.numpy import load_file
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    else:
      files = ["model.safetensors"]
    tensors = {}
    for name in files:
      tensors.update(load_file(os.path.join(path, name)))
  elif os.path.isfile(torch_bin):
    try:
      import torch
    except ImportError:
      raise InteropError(f"{torch_bin} is a torch pickle and torch is not installed; fix: "
                         "pip install torch, or convert it to safetensors") from None
    state = torch.load(torch_bin, map_location="cpu", weights_only=True)
    tensors = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise InteropError(f"{path!r} holds no model.safetensors, sharded safetensors index or "
                       "pytorch_model.bin; fix: point at the checkpoint directory")
  return hf_config, {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _get(hf: dict, *keys, default=None):
  for k in keys:
    if k in hf:
      return hf[k]
  return default


def config_from_hf(hf: dict, *, dtype: str = "float32") -> ml_collections.ConfigDict:
  """Our config for a Hugging Face Mamba2Config or a state-spaces MambaConfig dict."""
  ssm = hf.get("ssm_cfg") or {}
  if ssm and ssm.get("layer", "Mamba2") != "Mamba2":
    raise InteropError(f"config ssm_cfg.layer={ssm['layer']!r}: only Mamba-2 checkpoints are "
                       "supported; fix: use a mamba2-* checkpoint")
  d_model = _get(hf, "hidden_size", "d_model")
  n_layers = _get(hf, "num_hidden_layers", "n_layer")
  vocab = hf.get("vocab_size")
  if d_model is None or n_layers is None or vocab is None:
    raise InteropError("config.json lacks hidden_size/d_model, num_hidden_layers/n_layer or "
                       "vocab_size; fix: use the config the checkpoint was saved with")
  for key, bad in (("use_bias", True), ("rms_norm", False)):
    if hf.get(key, not bad) == bad:
      raise InteropError(f"config {key}={bad}: not supported by our Mamba-2 block (no "
                         "projection biases, RMSNorm only); fix: use a checkpoint without it")
  limit = [float(x["__float__"]) if isinstance(x, dict) else float(x)
           for x in hf.get("time_step_limit") or (0.0, math.inf)]
  if limit[0] > 0 or math.isfinite(limit[1]):
    raise InteropError(f"config time_step_limit={limit}: dt clamping is not implemented; fix: "
                       "use a checkpoint with the default (0, inf)")
  expand = _get(hf, "expand", default=ssm.get("expand", 2))
  head_dim = _get(hf, "head_dim", default=ssm.get("headdim", 64))
  heads = hf.get("num_heads")
  if heads is not None and heads * head_dim != expand * d_model:
    raise InteropError(f"config num_heads={heads} x head_dim={head_dim} != expand x "
                       f"hidden_size = {expand * d_model}; fix: correct config.json")
  over = {
      "name": f"mamba2_hf_{d_model}x{n_layers}",
      "model.vocab_size": vocab, "model.d_model": d_model, "model.pattern": "m",
      "model.num_units": n_layers,
      "model.tie_embeddings": bool(_get(hf, "tie_word_embeddings", "tie_embeddings",
                                        default=True)),
      "model.norm_eps": float(_get(hf, "layer_norm_epsilon", "norm_epsilon", default=1e-5)),
      "model.dtype": dtype,
      "mamba.d_state": _get(hf, "state_size", default=ssm.get("d_state", 128)),
      "mamba.d_conv": _get(hf, "conv_kernel", default=ssm.get("d_conv", 4)),
      "mamba.expand": expand, "mamba.head_dim": head_dim,
      "mamba.n_groups": _get(hf, "n_groups", default=ssm.get("ngroups", 1)),
      "mamba.chunk_size": _get(hf, "chunk_size", default=ssm.get("chunk_size", 256)),
  }
  return load_config("base", over)


# Our parameter path (inside layers.<i>) for each per-layer tensor, and how to reshape it.
_LAYER_MAP = {
    "norm.weight": ("norm", "weight", lambda t: t),
    "mixer.in_proj.weight": ("mixer", "in_proj", "kernel", lambda t: t.T),
    "mixer.conv1d.weight": ("mixer", "conv_weight", lambda t: t[:, 0, :].T),
    "mixer.conv1d.bias": ("mixer", "conv_bias", lambda t: t),
    "mixer.dt_bias": ("mixer", "dt_bias", lambda t: t),
    "mixer.A_log": ("mixer", "A_log", lambda t: t),
    "mixer.D": ("mixer", "D", lambda t: t),
    "mixer.norm.weight": ("mixer", "norm", "weight", lambda t: t),
    "mixer.out_proj.weight": ("mixer", "out_proj", "kernel", lambda t: t.T),
}
_LAYER_RE = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")


def _target(name: str):
  """A checkpoint tensor name -> (path into our params, transform), or None if unknown."""
  if name in ("backbone.embeddings.weight", "backbone.embedding.weight"):
    return ("embed", "embedding"), "embedding"
  if name == "backbone.norm_f.weight":
    return ("final_norm", "weight"), lambda t: t
  if name == "lm_head.weight":
    return ("lm_head", "kernel"), "lm_head"
  m = _LAYER_RE.match(name)
  if m and m.group(2) in _LAYER_MAP:
    *path, fn = _LAYER_MAP[m.group(2)]
    return ("layers", int(m.group(1)), *path), fn
  return None


def _pad_rows(t: np.ndarray, rows: int, name: str) -> np.ndarray:
  """Vocabulary rows padded with zeros up to our padded vocabulary size."""
  if t.shape[0] > rows:
    raise InteropError(f"tensor {name} has {t.shape[0]} vocabulary rows, more than the "
                       f"{rows} the config's vocab_size pads to; fix: set vocab_size in "
                       "config.json to the tokenizer's size")
  return np.pad(t, [(0, rows - t.shape[0])] + [(0, 0)] * (t.ndim - 1))


def load_params(model, cfg, tensors: dict[str, np.ndarray]) -> None:
  """Writes the checkpoint's tensors into `model` (a LanguageModel of 'm' layers), in place."""
  params = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(params))
  rows = padded_vocab_size(cfg)
  assigned = set()
  tied = cfg.model.tie_embeddings
  for name, t in tensors.items():
    found = _target(name)
    if found is None:
      raise InteropError(f"checkpoint tensor {name} {t.shape} has no place in our Mamba-2 "
                         "model; fix: check the checkpoint is a plain Mamba2ForCausalLM")
    path, fn = found
    if name == "lm_head.weight" and tied:
      embed = tensors.get("backbone.embeddings.weight",
                          tensors.get("backbone.embedding.weight"))
      if embed is not None and not np.array_equal(embed, t):
        raise InteropError("lm_head.weight differs from the embedding but the config ties "
                           "them; fix: set tie_word_embeddings=false in config.json")
      continue
    if fn == "embedding":
      value = _pad_rows(t, rows, name)
    elif fn == "lm_head":
      value = _pad_rows(t, rows, name).T
    else:
      value = fn(t)
    if path not in flat:
      raise InteropError(f"checkpoint tensor {name} maps to {'.'.join(map(str, path))}, which "
                         f"our model (config {cfg.name}) does not have; fix: check num layers "
                         "and tie_word_embeddings in config.json")
    var = flat[path]
    if tuple(var[...].shape) != value.shape:
      raise InteropError(f"checkpoint tensor {name} has shape {t.shape}; our "
                         f"{'.'.join(map(str, path))} needs {tuple(var[...].shape)} (after "
                         "layout change); fix: check config.json matches the weights")
    var[...] = jnp.asarray(value, var[...].dtype)
    assigned.add(path)
  missing = []
  for path in flat:
    if path in assigned:
      continue
    if path[-1] == "conv_bias":        # use_conv_bias=False: the bias is zero
      flat[path][...] = jnp.zeros_like(flat[path][...])
      continue
    missing.append(".".join(map(str, path)))
  if missing:
    raise InteropError(f"checkpoint has no tensor for {len(missing)} of our parameters, e.g. "
                       f"{missing[:3]}; fix: check the checkpoint is complete")
  nnx.update(model, nnx.from_flat_state(flat))


def load_hf_mamba2(path: str, *, dtype: str = "float32"):
  """A Hugging Face / state-spaces Mamba-2 checkpoint directory -> (model, cfg).

  The model is ready to call: `logits, aux = model(tokens)`, logits [batch, seq, vocab].
  """
  hf_config, tensors = read_checkpoint(path)
  cfg = config_from_hf(hf_config, dtype=dtype)
  model = build_model(cfg, rngs=nnx.Rngs(0))
  load_params(model, cfg, tensors)
  return model, cfg
