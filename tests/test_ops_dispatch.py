"""One vocabulary for every op: the route each (op, implementation, interpret, platform) takes,
and the same error for the same mistake (docs/kernels/dispatch.md is this table)."""
from __future__ import annotations

import pytest

from taipan_jax.ops import dispatch
from taipan_jax.ops.attention import DECODE_KERNELS, KERNELS as ATTENTION_KERNELS
from taipan_jax.ops.decode import KERNELS as DECODE_BLOCK_KERNELS
from taipan_jax.ops.ssd import KERNELS as SSD_KERNELS
from taipan_jax.ops.dispatch import Route, choose

# Shapes every kernel tiles, and one that no GPU kernel tiles.
FITS = dict(head_dim=64, d_state=128)
ODD = dict(head_dim=48, d_state=128)
OPS = {"ssd": SSD_KERNELS, "selective attention": ATTENTION_KERNELS,
       "decode attention": DECODE_KERNELS, "decode block": DECODE_BLOCK_KERNELS}

# (op, platform, implementation, interpret) -> route, or the start of the error's message.
TABLE = {
    ("ssd", "gpu", "auto", False): Route("pallas", "gpu"),
    ("ssd", "tpu", "auto", False): Route("pallas", "tpu"),
    ("ssd", "cpu", "auto", False): Route("xla"),
    ("ssd", "gpu", "pallas", False): Route("pallas", "gpu"),
    ("ssd", "tpu", "pallas", False): Route("pallas", "tpu"),
    ("ssd", "cpu", "pallas", False): "no Pallas SSD kernel for platform 'cpu'",
    ("ssd", "gpu", "pallas", True): Route("pallas", "gpu", True),
    ("ssd", "cpu", "pallas", True): Route("pallas", "tpu", True),
    ("ssd", "cpu", "auto", True): Route("xla"),
    ("selective attention", "gpu", "auto", False): Route("pallas", "gpu"),
    ("selective attention", "tpu", "auto", False): Route("pallas", "tpu"),
    ("selective attention", "tpu", "pallas", False): Route("pallas", "tpu"),
    ("selective attention", "cpu", "pallas", False):
        "no Pallas selective attention kernel for platform 'cpu'",
    ("selective attention", "cpu", "pallas", True): Route("pallas", "tpu", True),
    ("decode attention", "gpu", "auto", False): Route("pallas", "gpu"),
    ("decode attention", "tpu", "auto", False): Route("xla"),
    ("decode attention", "tpu", "pallas", False):
        "no Pallas decode attention kernel for platform 'tpu'",
    ("decode attention", "cpu", "pallas", True): Route("pallas", "gpu", True),
    ("decode attention", "tpu", "pallas", True): Route("pallas", "gpu", True),
    ("decode block", "gpu", "pallas", False): Route("pallas", "gpu"),
    ("decode block", "cpu", "pallas", False): "no Pallas decode kernel for platform 'cpu'",
    ("decode block", "cpu", "pallas", True): Route("pallas", "gpu", True),
}


@pytest.fixture
def platform(monkeypatch):
  monkeypatch.delenv(dispatch.ENV_IMPLEMENTATION, raising=False)
  monkeypatch.delenv(dispatch.ENV_INTERPRET, raising=False)
  return lambda name: monkeypatch.setattr(dispatch, "target_platform", lambda: name)


@pytest.mark.parametrize("key", list(TABLE), ids=lambda k: "-".join(map(str, k)))
def test_route(platform, key):
  op, target, implementation, interpret = key
  platform(target)
  want = TABLE[key]
  if isinstance(want, str):
    with pytest.raises(ValueError, match=want):
      choose(OPS[op], implementation, interpret, **FITS)
  else:
    assert choose(OPS[op], implementation, interpret, **FITS) == want


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("target", ["cpu", "gpu", "tpu"])
def test_xla_is_xla_everywhere(platform, op, target):
  platform(target)
  assert choose(OPS[op], "xla", **FITS) == Route("xla")


def test_shapes_the_gpu_kernels_cannot_tile(platform):
  platform("gpu")
  for kernels in (SSD_KERNELS, ATTENTION_KERNELS, DECODE_KERNELS, DECODE_BLOCK_KERNELS):
    assert choose(kernels, "auto", **ODD) == Route("xla")      # auto: XLA, silently
    with pytest.raises(ValueError, match=r"kernel cannot tile head_dim=48 \(a power of two"):
      choose(kernels, "pallas", **ODD)                          # asked for: an error
  platform("tpu")
  assert choose(SSD_KERNELS, "pallas", **ODD) == Route("pallas", "tpu")
  # The Mosaic SSD tiles chunks of 128: auto takes XLA at a chunk of 64, pallas names it.
  assert choose(SSD_KERNELS, "auto", chunk_size=64, **ODD) == Route("xla")
  with pytest.raises(ValueError, match=r"TPU SSD kernel cannot tile chunk_size=64 \(a multiple "
                                       r"of 128 needed\)"):
    choose(SSD_KERNELS, "pallas", chunk_size=64, **ODD)
  # That is Mosaic's limit, not the algorithm's: interpret mode runs any chunk.
  assert choose(SSD_KERNELS, "pallas", True, chunk_size=16, **ODD) == Route("pallas", "tpu", True)


def test_decode_auto_follows_the_measured_rule(platform):
  platform("gpu")
  assert choose(DECODE_BLOCK_KERNELS, kernel_by_default=True) == Route("pallas", "gpu")
  assert choose(DECODE_BLOCK_KERNELS, kernel_by_default=False) == Route("xla")
  assert choose(DECODE_BLOCK_KERNELS, "pallas", kernel_by_default=False) == Route("pallas", "gpu")


@pytest.mark.parametrize("op", list(OPS))
def test_same_errors_for_the_same_mistakes(platform, op):
  platform("cpu")
  with pytest.raises(ValueError, match=r"^implementation='fast' is unknown; use one of"):
    choose(OPS[op], "fast")
  with pytest.raises(ValueError, match=r"^implementation='reference' is the old spelling; "
                                       r"use 'xla'"):
    choose(OPS[op], "reference")
  with pytest.raises(ValueError, match=r"^implementation='interpret' is the old spelling; "
                                       r"use 'pallas' with interpret=True"):
    choose(OPS[op], "interpret")


def test_environment(platform, monkeypatch):
  platform("cpu")
  monkeypatch.setenv("TAIPAN_KERNELS", "pallas")
  monkeypatch.setenv("TAIPAN_INTERPRET", "1")
  assert choose(SSD_KERNELS) == Route("pallas", "tpu", True)
  assert choose(SSD_KERNELS, "xla") == Route("xla")          # an explicit choice wins
  monkeypatch.setenv("TAIPAN_KERNELS", "reference")
  with pytest.raises(ValueError, match=r"^\$TAIPAN_KERNELS='reference' is the old spelling"):
    choose(SSD_KERNELS)
  monkeypatch.setenv("TAIPAN_KERNELS", "auto")
  monkeypatch.setenv("TAIPAN_INTERPRET", "yes")
  with pytest.raises(ValueError, match=r"TAIPAN_INTERPRET='yes' is not a switch"):
    choose(SSD_KERNELS)


if __name__ == "__main__":      # prints the table of docs/kernels/dispatch.md
  import itertools
  from unittest import mock
  for op, (target, impl, interp) in itertools.product(
      OPS, itertools.product(("cpu", "gpu", "tpu"), ("auto", "xla", "pallas"), (False, True))):
    with mock.patch.object(dispatch, "target_platform", lambda: target):
      try:
        r = choose(OPS[op], impl, interp, **FITS)
        what = "XLA" if r.implementation == "xla" else (
            f"{r.platform.upper()} kernel" + (", interpreted" if r.interpret else ""))
      except ValueError as e:
        what = f"error: {e}"
    print(f"| {op} | {target} | {impl} | {interp} | {what} |")
