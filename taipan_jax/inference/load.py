"""A trained model and its tokenizer, from the workdir `taipan train` wrote."""
from __future__ import annotations

import dataclasses
import os

import ml_collections
from flax import nnx

from taipan_jax.config import load_config
from taipan_jax.data.tokenizer import check_vocab, load_tokenizer
from taipan_jax.models import LanguageModel, build_model
from taipan_jax.training import workdir as workdirs


@dataclasses.dataclass
class Loaded:
  model: LanguageModel                    # in evaluation mode
  cfg: ml_collections.ConfigDict
  step: int
  tokenizer: object | None                # SentencePieceProcessor for text runs, else None


def load_workdir(workdir: str, overrides: dict | None = None, log=print) -> Loaded:
  """The newest readable checkpoint of `workdir` as a model in evaluation mode.

  overrides: config fields to change (e.g. {'sal.kernel': 'pallas'}); the model's own fields
  must match the checkpoint. Text runs also get their tokenizer (the workdir's own copy,
  unless overrides name another), checked against the model's vocabulary before anything
  else is loaded. The workdir is opened read-only.
  """
  workdirs.check_readable(workdir)
  cfg = load_config(os.path.join(workdir, "config.json"), overrides)
  tokenizer = None
  if cfg.data.task == "text":
    kept = workdirs.kept_tokenizer(workdir)
    path = (kept[0] if kept is not None and "data.tokenizer" not in (overrides or {})
            else cfg.data.tokenizer)
    tokenizer = load_tokenizer(path)
    check_vocab(tokenizer, cfg.model.vocab_size, path)
  cfg, _, _, state, step = workdirs.restore(workdir, overrides, log)
  model = build_model(cfg, rngs=nnx.Rngs(params=0, gumbel=1))
  nnx.update(model, state.params)
  model.eval()
  return Loaded(model=model, cfg=cfg, step=step, tokenizer=tokenizer)
