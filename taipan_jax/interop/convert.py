"""Write converted or upcycled weights as a workdir that `taipan train` and `eval` resume.

The workdir gets `config.json` and a step-0 checkpoint (parameters, a fresh optimizer state,
no data position), so `taipan train --config=WORKDIR/config.json --workdir=WORKDIR` fine-tunes
from the converted weights, with any data or optimizer overrides on the command line.
"""
from __future__ import annotations

import os

import jax

from taipan_jax.training import workdir as workdirs
from taipan_jax.training.checkpoint import Checkpointer
from taipan_jax.training.step import make_steps


def save_workdir(model, cfg, workdir: str) -> str:
  """Saves `model` (its Params) under `workdir`; returns the path of its config.json."""
  workdirs.check(workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    raise FileExistsError(f"workdir {workdir!r} already holds checkpoints; fix: convert into "
                          "a new --workdir")
  workdirs.own(workdir)
  state = make_steps(cfg, lambda: model).init_state()
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    checkpointer.save(jax.device_get(state), data_state=None, cfg=cfg, force=True)
  finally:
    checkpointer.close()
  return workdirs.record_start(cfg, workdir, step=0, log=lambda _: None)
