"""Where benchmark results go: <out>/<stem>_<device kind>.json, one file per device."""
from __future__ import annotations

import json
import os

import jax


def result_path(out_dir: str, stem: str, suffix: str = ".json") -> str:
  """<out_dir>/<stem>_<device kind, lower case>.<suffix>; the folder is made if missing."""
  os.makedirs(out_dir, exist_ok=True)
  kind = jax.devices()[0].device_kind.lower().replace(" ", "_")
  return os.path.join(out_dir, f"{stem}_{kind}{suffix}")


def write_result(out_dir: str, stem: str, record: dict) -> str:
  """Writes record as JSON at result_path(out_dir, stem), says so, returns the path."""
  path = result_path(out_dir, stem)
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  print(f"wrote {path}")
  return path
