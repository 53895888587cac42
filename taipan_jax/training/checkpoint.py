"""Checkpoints with orbax: training state, data-iterator position and run metadata.

Layout: `<workdir>/checkpoints/<step>/{state,meta}`. orbax writes each step into a
temporary directory and renames it when complete, so a killed save leaves no half-written
step behind; saves are asynchronous (training continues while arrays are written). `meta`
holds the data iterator's state (taken when the save is requested, before the iterator
moves on), the model config and the wall time.

On restore the newest step is tried first. A step that cannot be read is reported in one
line, moved to `<workdir>/checkpoints_corrupt/`, and the previous one is tried.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
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
  """Fields that differ between a checkpoint's model signature and the config's. A field
  the checkpoint does not name (written before the field existed, or one that does not shape
  the parameters) is not compared."""
  ignored = {("sal", "kernel"), ("sal", "inference_selection"), ("sal", "inference_capacity"),
             ("attention", "max_cache_len"), ("mamba", "kernel")}
  out = []
  for section in _MODEL_SECTIONS:
    if section not in stored:
      out.append(section)
      continue
    for key, value in stored[section].items():
      if (section, key) not in ignored and current.get(section, {}).get(key) != value:
        out.append(f"{section}.{key}")
  return out


def write_config(cfg, workdir: str) -> str:
  """`<workdir>/config.json`, the config `taipan eval` and `--config=` read back."""
  path = os.path.join(workdir, "config.json")
  with open(path, "w") as f:
    f.write(cfg.to_json(indent=2))
  return path


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, log=print):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.log = log
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))

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
    """The newest readable checkpoint: (state, data_state, step), or None if there is none."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:    # orbax raises many types for unreadable files
        self._quarantine(step, e)
        continue
      # Checked before any array is read: another model's checkpoint is the user's mistake,
      # not a corrupt file, and is left where it is.
      differ = signature_differences(meta.get("model") or {}, model_signature(cfg))
      if differ:
        raise CheckpointError(
            f"the checkpoint at step {step} in {self.directory} was written for another "
            f"model config ({', '.join(differ)} differ); fix: use a new --workdir or "
            "the config it was trained with")
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]
      except Exception as e:
        self._quarantine(step, e)
        continue
      return state, meta["data_state"], step
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    reason = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
    src = os.path.join(self.directory, str(step))
    dst_dir = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
    os.makedirs(dst_dir, exist_ok=True)
    dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
    shutil.move(src, dst)
    self.manager.reload()
    print(f"checkpoint step {step} is unreadable ({reason}); moved it to {dst} and trying "
          "the previous one", file=sys.stderr, flush=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _json_default(x):
  try:
    return x.item()         # numpy scalars in grain iterator states
  except AttributeError:
    raise TypeError(f"cannot store {type(x).__name__} in checkpoint metadata") from None
