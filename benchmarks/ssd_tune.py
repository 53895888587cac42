r"""Block sizes of the GPU SSD kernels: each stage timed on its own over a sweep.

Stages: forward (y and final state), states (the state entering each backward chunk),
state_grads (reverse pass), chunk_grads (every gradient, per chunk). The best setting of each
stage is printed; BlockSizes.for_backend("gpu") holds the chosen defaults.

    python benchmarks/ssd_tune.py                 # the issue's shape: 8 x 4096, 24 x 64, 128
Writes benchmarks/results/ssd_tune_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import BlockSizes
from pallas_kernels.ssd import gpu
from timing import median_ms


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="8,4096,24,64,1,128")
  parser.add_argument("--stages", default="forward,states,state_grads,chunk_grads")
  args = parser.parse_args()
  b, l, h, p, g, n = map(int, args.shape.split(","))
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  bf = jnp.bfloat16
  x = jax.random.normal(k[0], (b, l, h, p), bf)
  dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, h)) - 2.0)
  A = -jnp.exp(jax.random.uniform(k[2], (h,), maxval=np.log(16.0)))
  B = jax.random.normal(k[3], (b, l, g, n), bf)
  C = jax.random.normal(k[4], (b, l, g, n), bf)
  dy = jax.random.normal(k[5], (b, l, h, p), bf)
  init = jnp.zeros((b, h, p, n), jnp.float32)
  seg = jnp.zeros((b, l), jnp.int32)
  rows = []

  def record(stage, bs, ms):
    rows.append({"stage": stage, "ms": ms, **dataclasses.asdict(bs)})
    print(f"{stage:<12} {ms:8.3f} ms  {bs}", flush=True)

  stages = args.stages.split(",")
  sequential = [BlockSizes(chunk=q, chunk_bwd=q, block_p=bp, num_warps=w, num_stages=s)
                for q, bp, w, s in itertools.product((32, 64, 128), (16, 32, 64), (4, 8), (1, 2))]
  for bs in sequential:
    try:
      if "forward" in stages:
        f = jax.jit(lambda *a, bs=bs: gpu.ssd_forward_gpu(*a, block_sizes=bs))
        record("forward", bs, median_ms(lambda: f(x, dt, A, B, C, init, seg)))
      if "states" in stages:
        f = jax.jit(lambda *a, bs=bs: gpu.ssd_forward_gpu(*a, block_sizes=bs, emit_states=True))
        record("states", bs, median_ms(lambda: f(x, dt, A, B, C, init, seg)))
      if "state_grads" in stages:
        f = jax.jit(lambda *a, bs=bs: gpu.ssd_state_grads_gpu(*a, head_dim=p, block_sizes=bs))
        record("state_grads", bs, median_ms(lambda: f(dt, A, C, seg, dy, init)))
    except Exception as e:  # noqa: BLE001 -- a setting that does not compile is skipped
      print(f"failed {bs}: {type(e).__name__}: {str(e)[:200]}")
  if "chunk_grads" in stages:
    for q, hpp, w, s in itertools.product((32, 64, 128), (1, 2, 4, 8, 24), (4, 8), (1, 2)):
      bs = BlockSizes(chunk=q, chunk_bwd=q, heads_per_program=hpp, num_warps=w, num_stages=s)
      try:
        states = jnp.zeros((b, h, pl_cdiv(l, q), p, n), bf)
        f = jax.jit(lambda *a, bs=bs: gpu.ssd_chunk_grads_gpu(*a, block_sizes=bs))
        record("chunk_grads", bs, median_ms(lambda: f(x, dt, A, B, C, seg, states, states, dy)))
      except Exception as e:  # noqa: BLE001
        print(f"failed {bs}: {type(e).__name__}: {str(e)[:200]}")
  best = {}
  for r in rows:
    if r["stage"] not in best or r["ms"] < best[r["stage"]]["ms"]:
      best[r["stage"]] = r
  print("\nbest per stage:")
  for stage, r in best.items():
    print(f"  {stage:<12} {r['ms']:.3f} ms  {r}")
  name = jax.devices()[0].device_kind.lower().replace(" ", "_")
  out = os.path.join(os.path.dirname(__file__), "results", f"ssd_tune_{name}.json")
  with open(os.environ.get("OUT_JSON", out), "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "shape": [b, l, h, p, g, n], "rows": rows, "best": best}, f, indent=1)


def pl_cdiv(a, b):
  return -(-a // b)


if __name__ == "__main__":
  main()
