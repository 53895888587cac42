"""How an op runs: one vocabulary and one decision for every op with a Pallas kernel.

    implementation  'xla'     the plain-JAX path in taipan_jax/ops (the fast XLA form)
                    'pallas'  the op's Pallas kernel for the target platform; an error where
                              the op has none there, or the kernel cannot tile the shape
                    'auto'    $TAIPAN_KERNELS when set, else the op's measured rule: the
                              kernel where it was measured faster, XLA elsewhere
    interpret       run the Pallas kernel in interpret mode ($TAIPAN_INTERPRET=1 sets it for
                    every op): the target platform's kernel, or on a platform the op has no
                    kernel for (a CPU) the op's first kernel family, so CI runs the kernels.
                    It changes how a kernel runs, never which implementation runs.

"reference" is not an implementation: it names only the naive oracles in
`pallas_kernels/<op>/reference.py` that every implementation is tested against.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping

from taipan_jax.ops.platform import target_platform

IMPLEMENTATIONS = ("auto", "xla", "pallas")
# Spellings of an older vocabulary, refused with the new one.
RENAMED = {"reference": "'xla'", "interpret": "'pallas' with interpret=True"}
ENV_IMPLEMENTATION = "TAIPAN_KERNELS"
ENV_INTERPRET = "TAIPAN_INTERPRET"


class TileRule:
  """A tiling rule on one dimension (None: not given, which passes); `need` says it in words."""

  def __init__(self, test: Callable[[int], bool], need: str, interpreted: bool = True):
    # interpreted=False: a limit of the compiler (Mosaic's tiling), not of the algorithm, so
    # interpret mode does not have it.
    self.test, self.need, self.interpreted = test, need, interpreted

  def __call__(self, v: int | None) -> bool:
    return v is None or self.test(v)


def power_of_two(minimum: int = 1) -> TileRule:
  return TileRule(lambda v: v >= minimum and not v & (v - 1), f"a power of two >= {minimum}")


def multiple_of(m: int, interpreted: bool = True) -> TileRule:
  return TileRule(lambda v: v % m == 0, f"a multiple of {m}", interpreted)


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The Pallas kernels of one op.

  name: the op's name in messages. tiles: platform -> {dimension name: rule}, in the order
  interpret mode falls back on (the first platform's kernel runs where the target has none).
  """
  name: str
  tiles: Mapping[str, Mapping[str, Callable[[int | None], bool]]]


@dataclasses.dataclass(frozen=True)
class Route:
  """What runs: implementation 'xla' or 'pallas'; for 'pallas' the kernel's platform and
  whether it is interpreted."""
  implementation: str
  platform: str | None = None
  interpret: bool = False


def check_implementation(implementation: str, where: str = "implementation") -> str:
  """`implementation` if it is in the vocabulary; else one line naming the right spelling."""
  if implementation in RENAMED:
    raise ValueError(f"{where}={implementation!r} is the old spelling; use "
                     f"{RENAMED[implementation]} (one of {IMPLEMENTATIONS}, and interpret "
                     f"or ${ENV_INTERPRET}=1 for interpret mode)")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{where}={implementation!r} is unknown; use one of {IMPLEMENTATIONS}")
  return implementation


def _env_interpret() -> bool:
  text = os.environ.get(ENV_INTERPRET, "0").strip().lower()
  if text not in ("0", "1", "false", "true", ""):
    raise ValueError(f"${ENV_INTERPRET}={text!r} is not a switch; use 1 or 0")
  return text in ("1", "true")


def choose(kernels: Kernels, implementation: str = "auto", interpret: bool = False, *,
           kernel_by_default: bool = True, **dims: int | None) -> Route:
  """The route of one call.

  kernel_by_default: whether 'auto' takes the kernel at this call's shape where the target
  has one that tiles it (the op's rule: measured faster on a GPU, lower compiled cost on a
  TPU); 'auto' never takes a kernel on a CPU. dims: the call's dimensions the kernels' tiling
  rules read (head_dim=, d_state=, chunk_size=).
  """
  if implementation == "auto":
    implementation = check_implementation(os.environ.get(ENV_IMPLEMENTATION, "auto"),
                                          f"${ENV_IMPLEMENTATION}")
  else:
    check_implementation(implementation)
  interpret = bool(interpret) or _env_interpret()
  target = platform = target_platform()
  if interpret and platform not in kernels.tiles:
    platform = next(iter(kernels.tiles))
  rules = kernels.tiles.get(platform)
  if rules is not None and interpret:
    rules = {d: rule for d, rule in rules.items() if rule.interpreted}
  fits = rules is not None and all(rule(dims.get(d)) for d, rule in rules.items())
  if implementation == "auto":
    pallas = kernel_by_default and fits and target in ("gpu", "tpu")
    return Route("pallas", platform, interpret) if pallas else Route("xla")
  if implementation == "xla":
    return Route("xla")
  if rules is None:
    first = next(iter(kernels.tiles))
    raise ValueError(f"no Pallas {kernels.name} kernel for platform {platform!r}; use "
                     f"implementation 'xla', or interpret=True (${ENV_INTERPRET}=1) to run "
                     f"the {first.upper()} kernel in interpret mode")
  if not fits:
    bad = ", ".join(f"{d}={dims.get(d)} ({rule.need} needed)" for d, rule in rules.items()
                    if not rule(dims.get(d)))
    raise ValueError(f"the {platform.upper()} {kernels.name} kernel cannot tile {bad}; use "
                     f"implementation 'xla' or 'auto'")
  return Route("pallas", platform, interpret)
