"""Checkpoints with orbax: training state, data-iterator position and run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. orbax writes each step into a
temporary directory and renames it when complete, so a killed save leaves no half-written
step behind; saves are asynchronous (training continues while arrays are written). `meta`
holds the data iterator's state (taken when the save is requested, before the iterator
moves on), the model config and the wall time.

On restore the newest step is tried first, then the previous ones. When a readable step is
found, a training run (the writer) moves the newer unreadable ones to
`<workdir>/checkpoints_corrupt/` with one line each, so that it can save those steps again.
When none is readable, restore stops with one line naming them and moves nothing: a run
never silently starts again from step 0. A read-only opener (eval, generate, lm-eval) never
moves, deletes or cleans anything, so it can run beside a saving trainer.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time

import jax
from absl import logging
import orbax.checkpoint as ocp

from taipan_jax.training.state import all_finite


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used by this run (the message says why and what to do)."""


# The parts of a config that fix the parameters' shapes and meaning.
_MODEL_SECTIONS = ("model", "mamba", "sal", "attention")


def model_signature(cfg) -> dict:
  """The config sections that shape the parameters; which kernel computes them is not one."""
  sig = {k: cfg[k].to_dict() for k in _MODEL_SECTIONS}
  sig["mamba"].pop("kernel", None)
  for key in ("kernel", "inference_selection", "inference_capacity"):   # how, not what
    sig["sal"].pop(key, None)
  sig["attention"].pop("max_cache_len", None)      # a decode buffer's length, not a weight
  return sig


def signature_differences(stored: dict, current: dict) -> list[str]:
  """'section.field: stored -> current' for the fields that differ between a checkpoint's
  model signature and the config's. A field the checkpoint does not name (written before the
  field existed, or one that does not shape the parameters) is not compared."""
  ignored = {("sal", "kernel"), ("sal", "inference_selection"), ("sal", "inference_capacity"),
             ("attention", "max_cache_len"), ("mamba", "kernel")}
  out = []
  for section in _MODEL_SECTIONS:
    if section not in stored:
      out.append(f"{section}: missing from the checkpoint")
      continue
    for key, value in stored[section].items():
      now = current.get(section, {}).get(key)
      if (section, key) not in ignored and now != value:
        out.append(f"{section}.{key}: {value!r} -> {now!r}")
  return out


def restore_target(state):
  """The abstract state (shapes, dtypes, shardings) a checkpoint is restored into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


class Checkpointer:
  """read_only: open another run's checkpoints for reading (eval, generate): no temporary
  folders cleaned, nothing created, moved or deleted."""

  def __init__(self, workdir: str, *, keep: int, log=print, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.log = log
    self.read_only = read_only
    if read_only:
      # lightweight_initialize: list the steps without reading each one's metadata, which a
      # trainer beside us may be deleting (max_to_keep) at that moment.
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0,
                                             lightweight_initialize=True,
                                             enable_async_checkpointing=False,
                                             cleanup_tmp_directories=False)
      for attempt in range(5):
        try:
          # orbax warns at WARNING that a read-only manager is read-only; that is the point.
          with _quiet():
            self.manager = ocp.CheckpointManager(self.directory, options=options)
          return
        except FileNotFoundError:       # a step vanished while it was listed: list again
          if attempt == 4:
            raise
          time.sleep(0.05)
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, *, data_state, cfg, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` at its step; refuses a non-finite state."""
    step = int(state.step)
    if step in self.manager.all_steps():
      return False              # saved already (a periodic save on the final step)
    if not all_finite(state.params):
      self.log(f"not checkpointing step {step}: the parameters hold non-finite values")
      return False
    meta = {"data_state": data_state, "model": model_signature(cfg), "time": time.time(),
            "jax": jax.__version__}
    # JsonSave serialises at save time; json round trip makes a private copy of the state.
    meta = json.loads(json.dumps(meta, default=_json_default))
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, abstract_state, cfg):
    """The newest readable checkpoint: (state, data_state, step), or None if there is none.

    Raises CheckpointError when checkpoints exist but none can be read, or when they were
    written for another model."""
    unreadable = []                   # (step, reason), newest first
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:    # orbax raises many types for unreadable files
        if self._vanished(step):
          continue              # deleted by the trainer after we listed it
        unreadable.append((step, _reason(e)))
        continue
      # Checked before any array is read: another model's checkpoint is the user's mistake,
      # not a corrupt file, and is left where it is.
      differences = signature_differences(meta.get("model") or {}, model_signature(cfg))
      if differences:
        raise CheckpointError(
            f"the checkpoint at step {step} in {self.directory} was written for another "
            f"model ({'; '.join(differences)}); fix: use a new --workdir or the model config "
            "it was trained with")
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
      except Exception as e:
        if self._vanished(step):
          continue
        unreadable.append((step, _reason(e)))
        continue
      for bad, reason in unreadable:
        self._skip(bad, reason)
      return state, meta["data_state"], step
    if unreadable:
      names = ", ".join(os.path.join(self.directory, str(s)) for s, _ in unreadable)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be read ({names}; newest: "
          f"{unreadable[0][1]}); nothing was moved or deleted; fix: restore them from a "
          "backup, or move them out of the way to train again from step 0")
    return None

  def _vanished(self, step: int) -> bool:
    """A read-only opener beside a trainer: that step was deleted (max_to_keep) meanwhile."""
    return self.read_only and not os.path.isdir(os.path.join(self.directory, str(step)))

  def _skip(self, step: int, reason: str) -> None:
    """An unreadable step newer than the one restored: the writer moves it aside (it will
    save that step again), a reader leaves it where it is."""
    if self.read_only:
      print(f"checkpoint step {step} is unreadable ({reason}); using an earlier one",
            file=sys.stderr, flush=True)
      return
    src = os.path.join(self.directory, str(step))
    dst_dir = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
    shutil.move(src, dst)
    self.manager.reload()
    print(f"checkpoint step {step} is unreadable ({reason}); moved it to {dst} and resuming "
          "from an earlier one", file=sys.stderr, flush=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


@contextlib.contextmanager
def _quiet():
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _reason(error: Exception) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _json_default(x):
  try:
    return x.item()         # numpy scalars in grain iterator states
  except AttributeError:
    raise TypeError(f"cannot store {type(x).__name__} in checkpoint metadata") from None
