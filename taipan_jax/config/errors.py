"""The one error a config raises: a line naming the key, the value and the fix."""
from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key, the value and the fix."""


def fail(key: str, value: Any, problem: str, fix: str):
  raise ConfigError(f"config key {key}={value!r}: {problem}; fix: {fix}")
