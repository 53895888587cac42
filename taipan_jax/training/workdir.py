"""A workdir: the directory one run owns, and the only place taipan writes for it.

    <workdir>/taipan_workdir.json     marker: project and format version (written first)
    <workdir>/config.json             the config of the newest start (`--config=` reads it)
    <workdir>/configs/NNN_stepS.json  the config of every start, kept
    <workdir>/tokenizer/<name>        a copy of the text run's tokenizer, and its sha256
    <workdir>/checkpoints/<step>/     orbax (training/checkpoint.py)
    <workdir>/metrics.jsonl, tensorboard/, eval/

A directory that is neither empty nor marked is refused before anything is written: the
user's files are never replaced. Everything a workdir needs is inside it (the tokenizer
too, found relative to the workdir), so a moved or copied workdir keeps working.

`check` (may a run write here?), `own` (mark it), `record_start` (keep the config, print
what changed), `tokenizer_for_run` (keep the tokenizer) and `restore` (the newest
checkpoint as a state) are what training, conversion and inference share.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from typing import Callable

import ml_collections

MARKER = "taipan_workdir.json"
PROJECT = "taipan-jax"
FORMAT = 1
_TOKENIZER_DIR = "tokenizer"


class WorkdirError(ValueError):
  """A workdir this command may not use; the message names the path and the fix."""


def is_remote(path: str) -> bool:
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _refuse_remote(workdir: str) -> None:
  if is_remote(workdir):
    raise WorkdirError(
        f"--workdir={workdir!r} is a remote URL, which taipan does not read or write "
        "directly; fix: mount the bucket (e.g. `gcsfuse bucket /mnt/bucket`) and pass the "
        "mounted path")


def _marker(workdir: str) -> dict | None:
  path = os.path.join(workdir, MARKER)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      marker = json.load(f)
  except (OSError, json.JSONDecodeError):
    marker = None
  if not isinstance(marker, dict) or marker.get("project") != PROJECT:
    raise WorkdirError(f"{path} is not a {PROJECT} workdir marker; fix: pick another "
                       "--workdir (this directory belongs to something else)")
  if marker.get("format", 0) > FORMAT:
    raise WorkdirError(f"{workdir!r} was written by a newer taipan-jax (workdir format "
                       f"{marker['format']}, this one reads {FORMAT}); fix: upgrade taipan-jax")
  return marker


def _legacy(workdir: str) -> bool:
  """A workdir written before markers existed: a config.json beside orbax step folders."""
  checkpoints = os.path.join(workdir, "checkpoints")
  return (os.path.isfile(os.path.join(workdir, "config.json")) and os.path.isdir(checkpoints)
          and any(n.isdigit() for n in os.listdir(checkpoints)))


def check(workdir: str) -> bool:
  """May a run write to `workdir`? Raises WorkdirError (nothing written) if not.

  Returns True when it is already a taipan workdir (a resume), False when it is new or empty.
  """
  _refuse_remote(workdir)
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"workdir {workdir!r} is a file; fix: pick a directory for --workdir")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(f"workdir {workdir!r} is not writable ({parent} does not allow it); "
                       "fix: pick a --workdir you can write to")
  if not os.path.isdir(path) or not os.listdir(path):
    return False
  if _marker(path) is not None or _legacy(path):
    return True
  names = sorted(os.listdir(path))
  shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
  raise WorkdirError(f"workdir {workdir!r} holds files that are not a taipan run ({shown}); "
                     "nothing was changed; fix: pick a new or empty --workdir")


def check_readable(workdir: str) -> None:
  """A workdir `taipan train` or `convert` wrote, for a read-only command."""
  _refuse_remote(workdir)
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise WorkdirError(f"{workdir!r} holds no config.json: not a training workdir; fix: "
                       "point --workdir at the directory `taipan train` wrote")
  _marker(workdir)


def own(workdir: str) -> None:
  """Creates `workdir` if needed and marks it as a taipan workdir (after `check`)."""
  os.makedirs(workdir, exist_ok=True)
  if _marker(workdir) is None:
    from taipan_jax.version import __version__
    _write_json(os.path.join(workdir, MARKER),
                {"project": PROJECT, "format": FORMAT, "created": time.time(),
                 "taipan_jax": __version__})


def _write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(tmp, path)


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(old: dict, new: dict) -> list[str]:
  """'key: old -> new' for every field that differs between two config dicts."""
  a, b = _flatten(old), _flatten(new)
  return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def previous_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def record_start(cfg: ml_collections.ConfigDict, workdir: str, *, step: int,
                 log: Callable[[str], None] = print) -> str:
  """Keeps this start's config (`configs/NNN_stepS.json`, and `config.json` as the newest)
  and logs the fields that changed since the previous start; returns config.json's path."""
  new = json.loads(cfg.to_json())
  old = previous_config(workdir)
  if old is not None:
    changes = config_changes(old, new)
    if changes:
      log(f"config changed since the last start (kept in {os.path.join(workdir, 'configs')}):"
          f" {'; '.join(changes)}")
  history = os.path.join(workdir, "configs")
  os.makedirs(history, exist_ok=True)
  index = len([n for n in os.listdir(history) if n.endswith(".json")])
  _write_json(os.path.join(history, f"{index:03d}_step{step}.json"), new)
  path = os.path.join(workdir, "config.json")
  _write_json(path, new)
  return path


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def kept_tokenizer(workdir: str) -> tuple[str, str] | None:
  """(path, sha256) of the tokenizer copy a workdir keeps, or None."""
  record = os.path.join(workdir, _TOKENIZER_DIR, "sha256.json")
  if not os.path.isfile(record):
    return None
  with open(record) as f:
    meta = json.load(f)
  return os.path.join(workdir, _TOKENIZER_DIR, meta["file"]), meta["sha256"]


def tokenizer_for_run(cfg, workdir: str, *, log: Callable[[str], None] = print) -> str:
  """The tokenizer file a text run reads, checked against the workdir's copy.

  A new run: cfg's file (copied into the workdir by `keep_tokenizer`). A resume: the copy;
  cfg's file must be the same bytes (a retrained tokenizer at the old path would silently
  re-map every token), or missing (a moved workdir).
  """
  kept = kept_tokenizer(workdir) if os.path.isdir(workdir) else None
  given = cfg.data.tokenizer
  if kept is None:
    return given
  path, digest = kept
  if not os.path.isfile(path) or _sha256(path) != digest:
    raise WorkdirError(f"the tokenizer copy {path} is missing or changed (sha256 differs "
                       f"from {digest[:12]}...); fix: restore it from a copy of this workdir")
  if given and os.path.isfile(given) and _sha256(given) != digest:
    raise WorkdirError(
        f"data.tokenizer={given!r} is not the tokenizer this workdir was trained with (sha256 "
        f"{_sha256(given)[:12]}... vs {digest[:12]}...); fix: pass "
        f"--config.data.tokenizer={path} or use a new --workdir")
  if given and not os.path.isfile(given):
    log(f"data.tokenizer={given!r} does not exist here; using the workdir's copy {path}")
  return path


def keep_tokenizer(path: str, workdir: str) -> None:
  """Copies a text run's tokenizer into the workdir with its sha256 (once)."""
  if not path or kept_tokenizer(workdir) is not None:
    return
  directory = os.path.join(workdir, _TOKENIZER_DIR)
  os.makedirs(directory, exist_ok=True)
  name = os.path.basename(path)
  shutil.copyfile(path, os.path.join(directory, name))
  _write_json(os.path.join(directory, "sha256.json"),
              {"file": name, "sha256": _sha256(path), "source": os.path.abspath(path)})


def with_tokenizer(cfg, path: str):
  """A copy of cfg that reads `path` as its tokenizer (cfg itself is left as given)."""
  if path == cfg.data.tokenizer:
    return cfg
  out = cfg.copy_and_resolve_references()
  out.data.tokenizer = path
  return out


def restore(workdir: str, overrides: dict | None = None,
            log: Callable[[str], None] = print):
  """The newest checkpoint of a workdir, opened read-only: (cfg, steps, plan, state, step).

  overrides: config fields to change on top of the workdir's config.json (data, kernels;
  the model fields must match the checkpoint, which its restore checks). Nothing in the
  workdir is moved, deleted or written.
  """
  from flax import nnx
  from taipan_jax.config import load_config
  from taipan_jax.models import build_model
  from taipan_jax.training import partition
  from taipan_jax.training.checkpoint import Checkpointer, CheckpointError, restore_target
  from taipan_jax.training.step import make_steps
  check_readable(workdir)
  cfg = load_config(os.path.join(workdir, "config.json"), overrides)
  steps = make_steps(cfg, lambda: build_model(cfg, rngs=nnx.Rngs(params=0, gumbel=1)))
  try:
    plan = partition.make_plan(cfg, steps.abstract_state)
  except partition.PartitionError as e:
    raise WorkdirError(str(e)) from None
  state = partition.init_state(steps, plan)
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, log=log,
                              read_only=True)
  try:
    restored = checkpointer.restore(restore_target(state), cfg)
  finally:
    checkpointer.close()
  if restored is None:
    raise CheckpointError(f"no checkpoint in {workdir!r}; fix: train first "
                          "(`taipan train --workdir=...`)")
  state, _, step = restored
  return cfg, steps, plan, state, step
