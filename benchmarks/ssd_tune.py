r"""Block sizes of the GPU SSD kernels: each stage timed on its own over a sweep.

Stages (pallas_kernels/ssd/gpu.py, gpu_two_level.py):
  forward      y and the final state: sequential, or two-level (chunk-parallel states, a
               light sequential pass, chunk-parallel output)
  states       the state entering each backward chunk (chunk_bwd): sequential or two-level
  state_grads  the gradient of the state after each backward chunk: sequential or two-level
  chunk_grads  every gradient, in programs of chunk_grad positions reading the states at
               chunk_bwd
The backward settings are shared by its three stages (chunk_bwd, num_warps_bwd, num_stages_bwd),
so the best backward is the best sum over the three at one such setting; it and the best
forward are printed, with the BlockSizes fields that give them (`--block_sizes` of ssd.py).
BlockSizes.for_backend("gpu") holds the chosen defaults.

    python benchmarks/ssd_tune.py                       # the issue's shape: 8 x 4096, 24 x 64
    python benchmarks/ssd_tune.py --shape=2,16384,24,64,1,128 --stages=forward,states,state_grads
Writes benchmarks/results/ssd_tune_<device>.json (or --out).
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

STAGES = ("forward", "states", "state_grads", "chunk_grads")


def _inputs(b, l, h, p, g, n):
  k = jax.random.split(jax.random.PRNGKey(0), 6)
  bf = jnp.bfloat16
  x = jax.random.normal(k[0], (b, l, h, p), bf)
  dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, h)) - 2.0)
  A = -jnp.exp(jax.random.uniform(k[2], (h,), maxval=np.log(16.0)))
  B = jax.random.normal(k[3], (b, l, g, n), bf)
  C = jax.random.normal(k[4], (b, l, g, n), bf)
  dy = jax.random.normal(k[5], (b, l, h, p), bf)
  return x, dt, A, B, C, dy


def _settings(stage, chunks, chunk_grads, warps, stages):
  """BlockSizes to time for one stage."""
  if stage == "forward":
    return [BlockSizes(chunk=q, two_level=t, num_warps=w, num_stages=s)
            for q, t, w, s in itertools.product(chunks, (False, True), warps, stages)]
  if stage in ("states", "state_grads"):
    return [BlockSizes(chunk_bwd=q, two_level=t, num_warps_bwd=w, num_stages_bwd=s)
            for q, t, w, s in itertools.product(chunks, (False, True), warps, stages)]
  return [BlockSizes(chunk_bwd=q, chunk_grad=cg, num_warps_bwd=w, num_stages_bwd=s)
          for q, cg, w, s in itertools.product(chunks, chunk_grads, warps, stages)
          if cg <= q and q % cg == 0]


def _time(stage, bs, x, dt, A, B, C, dy, init, seg):
  p = x.shape[3]
  if stage == "forward":
    f = jax.jit(lambda *a: gpu.ssd_forward_gpu(*a, block_sizes=bs))
    return median_ms(lambda: f(x, dt, A, B, C, init, seg))
  if stage == "states":
    f = jax.jit(lambda *a: gpu.ssd_forward_gpu(*a, block_sizes=bs, emit_states=True))
    return median_ms(lambda: f(x, dt, A, B, C, init, seg))
  if stage == "state_grads":
    f = jax.jit(lambda *a: gpu.ssd_state_grads_gpu(*a, head_dim=p, block_sizes=bs))
    return median_ms(lambda: f(dt, A, C, seg, dy, init))
  b, l, h = dt.shape
  states = jax.random.normal(jax.random.PRNGKey(1), (b, h, -(-l // bs.chunk_bwd), p,
                                                      B.shape[-1]), x.dtype)
  f = jax.jit(lambda *a: gpu.ssd_chunk_grads_gpu(*a, block_sizes=bs))
  return median_ms(lambda: f(x, dt, A, B, C, seg, states, states, dy))


def _fields(bs, keys):
  return ",".join(f"{k}={getattr(bs, k)}" for k in keys)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="8,4096,24,64,1,128")
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--chunks", default="32,64,128")
  parser.add_argument("--chunk_grads", default="16,32,64")
  parser.add_argument("--warps", default="4,8")
  parser.add_argument("--num_stages", default="1,2")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  ints = lambda s: tuple(int(v) for v in s.split(","))
  b, l, h, p, g, n = ints(args.shape)
  x, dt, A, B, C, dy = _inputs(b, l, h, p, g, n)
  init = jnp.zeros((b, h, p, n), jnp.float32)
  seg = jnp.zeros((b, l), jnp.int32)
  rows = []
  for stage in args.stages.split(","):
    for bs in _settings(stage, ints(args.chunks), ints(args.chunk_grads), ints(args.warps),
                        ints(args.num_stages)):
      try:
        ms = _time(stage, bs, x, dt, A, B, C, dy, init, seg)
      except Exception as e:  # noqa: BLE001 -- a setting that does not compile is skipped
        print(f"failed {stage} {bs}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      rows.append({"stage": stage, "ms": ms, **dataclasses.asdict(bs)})
      print(f"{stage:<12} {ms:8.3f} ms  {bs}", flush=True)
  best = {}
  for r in rows:
    if r["stage"] not in best or r["ms"] < best[r["stage"]]["ms"]:
      best[r["stage"]] = r
  print("\nbest per stage:")
  for stage, r in best.items():
    print(f"  {stage:<12} {r['ms']:.3f} ms  {r}")
  # The backward: its three stages share chunk_bwd, num_warps and num_stages_bwd.
  shared = lambda r: (r["chunk_bwd"], r["num_warps_bwd"], r["num_stages_bwd"])
  backward = {}
  for key in {shared(r) for r in rows if r["stage"] == "chunk_grads"}:
    parts = {}
    for stage in ("states", "state_grads", "chunk_grads"):
      cands = [r for r in rows if r["stage"] == stage and shared(r) == key]
      if cands:
        parts[stage] = min(cands, key=lambda r: r["ms"])
    if len(parts) == 3 and parts["states"]["two_level"] == parts["state_grads"]["two_level"]:
      backward[key] = parts
    elif len(parts) == 3:        # the two state passes share two_level: take the better pair
      pairs = []
      for t in (False, True):
        pair = [min((r for r in rows if r["stage"] == s and shared(r) == key
                     and r["two_level"] == t), key=lambda r: r["ms"], default=None)
                for s in ("states", "state_grads")]
        if None not in pair:
          pairs.append(pair)
      if pairs:
        states, grads = min(pairs, key=lambda pr: pr[0]["ms"] + pr[1]["ms"])
        backward[key] = {"states": states, "state_grads": grads,
                         "chunk_grads": parts["chunk_grads"]}
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "shape": [b, l, h, p, g, n], "rows": rows, "best": best}
  if backward:
    key, parts = min(backward.items(), key=lambda kv: sum(r["ms"] for r in kv[1].values()))
    total = sum(r["ms"] for r in parts.values())
    fields = (f"chunk_bwd={key[0]},chunk_grad={parts['chunk_grads']['chunk_grad']},"
              f"two_level={parts['states']['two_level']},num_warps_bwd={key[1]},"
              f"num_stages_bwd={key[2]}")
    print(f"\nbest backward: {total:.3f} ms (states {parts['states']['ms']:.3f}, state_grads "
          f"{parts['state_grads']['ms']:.3f}, chunk_grads {parts['chunk_grads']['ms']:.3f}): "
          f"{fields}")
    result["best_backward"] = {"ms": total, "fields": fields,
                               **{s: r["ms"] for s, r in parts.items()}}
  if "forward" in best:
    fields = _fields(BlockSizes(**{k: best["forward"][k] for k in
                                   ("chunk", "two_level", "num_warps", "num_stages")}),
                     ("chunk", "two_level", "num_warps", "num_stages"))
    print(f"best forward: {best['forward']['ms']:.3f} ms: {fields}")
    result["best_forward"] = {"ms": best["forward"]["ms"], "fields": fields}
  if "best_forward" in result and "best_backward" in result:
    # two_level is one field for the forward and the state passes: the backward's is kept.
    fwd = _fields(BlockSizes(**{k: best["forward"][k] for k in ("chunk", "num_warps",
                                                                "num_stages")}),
                  ("chunk", "num_warps", "num_stages"))
    print(f"ssd.py --block_sizes={fwd},{result['best_backward']['fields']}"
          + ("" if best["forward"]["two_level"] == parts["states"]["two_level"] else
             f"  (the forward alone was best with two_level={best['forward']['two_level']})"))
  name = jax.devices()[0].device_kind.lower().replace(" ", "_")
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"ssd_tune_{name}.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
