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

  On resume (`resume_step` given), JSON rows past the restored step are dropped: the
  steps after the last checkpoint are recomputed and written again, and the file keeps one
  row per step in order.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.jsonl_path):
      rows = []
      with open(self.jsonl_path) as f:
        for line in f:
          try:
            if json.loads(line).get("step", 0) <= resume_step:
              rows.append(line)
          except json.JSONDecodeError:
            pass            # a line cut short by a kill
      tmp = self.jsonl_path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(rows)
      os.replace(tmp, self.jsonl_path)
    self._jsonl = open(self.jsonl_path, "a")
    self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()
    summary = summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
