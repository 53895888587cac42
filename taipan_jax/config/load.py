"""Reading a config: a get_config() file, a bundled name or a run's config.json, with
`--config.a.b=value` overrides typed by the schema in configs/base.py."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from typing import Any, Mapping

import ml_collections

from taipan_jax.config.errors import ConfigError, fail as _fail
from taipan_jax.config.validation import validate
from taipan_jax.configs import base as _base


def _unknown(key: str, value: Any, name: str, choices) -> None:
  """An unknown section or field `name` of `key`: names the closest one, else lists them."""
  import difflib
  close = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
  if close:
    parts = key.split(".")
    parts[parts.index(name)] = close[0]
    _fail(key, value, f"unknown key {name!r}", f"did you mean {'.'.join(parts)}?")
  _fail(key, value, f"unknown key {name!r}", f"use one of {sorted(choices)}")


def load_config(path_or_name: str, overrides: Mapping[str, Any] | None = None
                ) -> ml_collections.ConfigDict:
  """Loads a config file (path), a bundled config (name such as "tiny") or a run's
  config.json, then validates it.

  overrides: dotted keys to values, e.g. {"model.d_model": 128}, applied before validation.
  """
  cfg = _read_config(path_or_name)
  for key, value in (overrides or {}).items():
    _set_dotted(cfg, key, value)
  return validate(cfg)


def _read_config(path_or_name: str) -> ml_collections.ConfigDict:
  """The unvalidated config of a .py file, a bundled name, or a run's config.json."""
  if path_or_name.endswith(".json") and os.path.isfile(path_or_name):
    with open(path_or_name) as f:
      try:
        written = json.load(f)
      except json.JSONDecodeError as e:
        raise ConfigError(f"config {path_or_name!r} is not valid JSON ({e}); fix: point at "
                          "the config.json a run wrote") from None
    # Onto the schema's defaults: a run written before a field existed reads it as its default.
    cfg = _base.get_config()
    _merge(cfg, written, path_or_name)
    return cfg
  if os.path.exists(path_or_name):
    spec = importlib.util.spec_from_file_location("_taipan_config", path_or_name)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except Exception as e:      # a broken config file: name the line, not a traceback
      raise ConfigError(f"config {path_or_name!r} line {_error_line(e, path_or_name)}: "
                        f"{type(e).__name__}: {e}; fix: correct the file") from None
  else:
    name = os.path.splitext(os.path.basename(path_or_name))[0]
    try:
      module = importlib.import_module(f"taipan_jax.configs.{name}")
    except ModuleNotFoundError:
      raise ConfigError(
          f"config {path_or_name!r}: no such file and no bundled config of that name; fix: "
          f"pass a path to a get_config() file or one of {bundled_configs()}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config {path_or_name!r}: the file defines no get_config(); "
                      "fix: add `def get_config(): ...` returning a ConfigDict")
  try:
    return module.get_config()
  except TypeError as e:     # ConfigDict refuses a value of the wrong type on assignment
    raise ConfigError(f"config {path_or_name!r}: {e}; fix: give the field a value of the "
                      "type configs/base.py declares") from None
  except Exception as e:
    raise ConfigError(f"config {path_or_name!r} line {_error_line(e, module.__file__)}: "
                      f"get_config() raised {type(e).__name__}: {e}; fix: correct the "
                      "file") from None


def _error_line(error: Exception, path: str) -> str:
  """The line of `path` an exception came from (a SyntaxError says it itself)."""
  if isinstance(error, SyntaxError):
    return str(error.lineno)
  import traceback
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  return str(lines[-1]) if lines else "?"


def _merge(cfg, values: Mapping[str, Any], source: str, prefix: str = "") -> None:
  for key, value in values.items():
    if key not in cfg:
      raise ConfigError(f"config {source!r}: unknown key {prefix}{key}; fix: remove it, or "
                        "use the taipan-jax version that wrote it")
    if isinstance(cfg[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
      _merge(cfg[key], value, source, f"{prefix}{key}.")
    else:
      try:
        cfg[key] = value
      except TypeError:
        _fail(prefix + key, value, f"in {source} is not a {cfg.get_type(key).__name__}",
              "correct the file")


def parse_overrides(args: list[str]) -> dict[str, Any]:
  """`--config.a.b=value` strings -> {"a.b": value} typed by the schema in configs/base.py."""
  schema = _base.get_config()
  out = {}
  for arg in args:
    key, sep, text = arg[len("--config."):].partition("=")
    if not sep:
      raise ConfigError(f"config override {arg!r} has no value; fix: write --config.{key}=VALUE")
    node = schema
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        _unknown(key, text, p, [k for k in node.keys()
                                if isinstance(node[k], ml_collections.ConfigDict)])
      node = node[p]
    if leaf not in node:
      _unknown(key, text, leaf, node.keys())
    out[key] = _parse_value(key, text, node.get_type(leaf))
  return out


def _parse_value(key: str, text: str, want: type):
  if text.lower() in ("none", "null"):
    return None
  try:
    if want is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    return want(text)
  except ValueError:
    _fail(key, text, f"is not of type {want.__name__}", f"give a {want.__name__} value")


def bundled_configs() -> list[str]:
  directory = os.path.dirname(_base.__file__)
  return sorted(f[:-3] for f in os.listdir(directory)
                if f.endswith(".py") and f not in ("__init__.py", "base.py"))


def _set_dotted(cfg, key: str, value):
  *parents, leaf = key.split(".")
  node = cfg
  for p in parents:
    if p not in node:
      _unknown(key, value, p, node.keys())
    node = node[p]
  if leaf not in node:
    _unknown(key, value, leaf, node.keys())
  try:
    node[leaf] = value
  except TypeError:
    want = node.get_type(leaf).__name__
    _fail(key, value, f"expected {want}, got {type(value).__name__}", f"give a {want}")
