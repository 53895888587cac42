"""Metrics out: TensorBoard event files and a JSON-lines file in the workdir.

TensorBoard events are written with tensorboard's own event-file writer (no TensorFlow
needed). Only process 0 writes.
"""
from __future__ import annotations

import json
import os
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricsWriter:
  """write(step, {name: float}) to `<workdir>/tensorboard/` and `<workdir>/metrics.jsonl`.

  The JSON-lines file is only ever appended to: a resumed run recomputes the steps after
  its checkpoint and appends their rows again, so a reader takes the last row per step
  (`read_metrics`). TensorBoard is told the same with a session-start event after the
  resumed step, which makes it drop the older run's points past that step.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0,
               jsonl: bool = True):
    self.enabled = enabled
    self._jsonl = None
    if not enabled:
      return
    if jsonl:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._events = EventFileWriter(os.path.join(workdir, "tensorboard") if jsonl else workdir)
    if resume_step:
      # TensorBoard keeps the points before a session start's step and drops the rest.
      self._events.add_event(event_pb2.Event(
          wall_time=time.time(), step=resume_step + 1,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    if self._jsonl is not None:
      self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
      self._jsonl.flush()
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    if self.enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._events.close()


def _kind(row: dict):
  """Train rows, eval rows and the rest (e.g. peak memory) are separate series."""
  if "loss" in row:
    return "train"
  if any(k.startswith("eval/") for k in row):
    return "eval"
  return tuple(sorted(k for k in row if k not in ("step", "time")))


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl`, the last one of each (step, kind) where a resumed
  run wrote a step again; lines that are not JSON objects (a kill mid-write) are skipped."""
  rows = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows[(row["step"], _kind(row))] = row
  return sorted(rows.values(), key=lambda r: r["step"])


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
