"""The one timing loop the benchmarks share."""
from __future__ import annotations

import time

import jax
import numpy as np


def median_ms(fn, reps=10, loops=5, sync=jax.block_until_ready):
  """Median milliseconds per call of fn() over `reps` samples of `loops` back-to-back calls;
  `sync(out)` waits for the device (jax.block_until_ready, or torch.cuda.synchronize)."""
  sync(fn())                     # compile / autotune outside the samples
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(loops):
      out = fn()
    sync(out)
    samples.append((time.perf_counter() - start) / loops)
  return float(np.median(samples)) * 1e3
