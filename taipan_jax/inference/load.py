"""A trained model and its tokenizer, from the workdir `taipan train` wrote."""
from __future__ import annotations

import dataclasses
import os

import ml_collections
from flax import nnx

import taipan_jax
from taipan_jax.data.tokenizer import check_vocab, load_tokenizer


@dataclasses.dataclass
class Loaded:
  model: "taipan_jax.LanguageModel"       # in evaluation mode
  cfg: ml_collections.ConfigDict
  step: int
  tokenizer: object | None                # SentencePieceProcessor for text runs, else None


def load_workdir(workdir: str, overrides: dict | None = None, log=print) -> Loaded:
  """The newest readable checkpoint of `workdir` as a model in evaluation mode.

  overrides: config fields to change (e.g. {'sal.kernel': 'pallas'}); the model's own fields
  must match the checkpoint. Text runs also get their tokenizer, checked against the model's
  vocabulary before anything else is loaded.
  """
  from taipan_jax.training.loop import restore_workdir
  config_path = os.path.join(workdir, "config.json")
  tokenizer = None
  if os.path.isfile(config_path):
    cfg = taipan_jax.load_config(config_path, overrides)
    if cfg.data.task == "text":
      tokenizer = load_tokenizer(cfg.data.tokenizer)
      check_vocab(tokenizer, cfg.model.vocab_size, cfg.data.tokenizer)
  cfg, _, _, state, step = restore_workdir(workdir, overrides, log)
  model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=0, gumbel=1))
  nnx.update(model, state.params)
  model.eval()
  return Loaded(model=model, cfg=cfg, step=step, tokenizer=tokenizer)
