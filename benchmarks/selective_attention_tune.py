r"""Where the GPU selective attention's time goes, and its block sizes.

Times, at the benchmark's shape (batch 2, seq 16384, 12 heads, head_dim 64, window 2048,
bf16) and selected fractions C: the public op (forward, forward+backward), the compaction of
the selection, and each kernel on its own (forward, dq, dk/dv) over a sweep of BlockSizes
(one tile for all three kernels). The best setting per kernel is printed.

    python benchmarks/selective_attention_tune.py [--fractions=0.15,1.0]
Writes benchmarks/results/selective_attention_tune_<device>.json.
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

from pallas_kernels.selective_attention import BlockSizes, compact_selection
from pallas_kernels.selective_attention import gpu
from pallas_kernels.selective_attention.common import Statics
from timing import median_ms


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="2,16384,12,64")
  parser.add_argument("--window", type=int, default=2048)
  parser.add_argument("--fractions", default="0.15,1.0")
  parser.add_argument("--blocks", default="32,64,128")
  parser.add_argument("--warps", default="4,8")
  parser.add_argument("--stages", default="2,3")
  parser.add_argument("--interpret", action="store_true", help="smoke-test on a CPU")
  args = parser.parse_args()
  b, l, h, d = map(int, args.shape.split(","))
  w = args.window
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, do = (jax.random.normal(key, (b, l, h, d), jnp.bfloat16) for key in keys)
  ok = jnp.ones((b, l), jnp.int32)
  seg = jnp.zeros((b, l), jnp.int32)
  blocks = tuple(map(int, args.blocks.split(",")))
  sweep = [BlockSizes.uniform(bq, bk, num_warps=nw, num_stages=ns)
           for bq, bk, nw, ns in itertools.product(
               blocks, blocks, map(int, args.warps.split(",")), map(int, args.stages.split(",")))]
  rows = []

  def record(fraction, stage, ms, bs=None):
    rows.append({"fraction": fraction, "stage": stage, "ms": ms,
                 **(dataclasses.asdict(bs) if bs else {})})
    print(f"C={fraction:<5} {stage:<14} {ms:8.3f} ms  {bs or ''}", flush=True)

  for fraction in map(float, args.fractions.split(",")):
    select = jnp.asarray(np.random.default_rng(0).random((b, l)) < fraction)
    op = jax.jit(lambda q, k, v: gpu.selective_attention_gpu(q, k, v, select, window=w,
                                                                  interpret=args.interpret))
    record(fraction, "op_fwd", median_ms(lambda: op(q, k, v)))
    fb = jax.jit(lambda q, k, v, do: jax.vjp(op, q, k, v)[1](do))
    record(fraction, "op_fwd_bwd", median_ms(lambda: fb(q, k, v, do)))
    bs0 = BlockSizes()
    compact = jax.jit(lambda s: compact_selection(s, w, bs0.slot_multiple))
    record(fraction, "compact", median_ms(lambda: compact(select)))
    for bs in sweep:
      try:
        pos, count = compact_selection(select, w, bs.slot_multiple)
        st = Statics(w, True, bs, args.interpret)
        fwd = jax.jit(lambda *a, st=st: gpu._forward(*a, st))
        record(fraction, "forward", median_ms(lambda: fwd(q, k, v, pos, count, ok, seg)), bs)
        o, lse = fwd(q, k, v, pos, count, ok, seg)
        dq = jax.jit(lambda *a, st=st: gpu._dq(*a, st))
        record(fraction, "dq", median_ms(lambda: dq(q, k, v, pos, ok, seg, o, lse, do)), bs)
        _, delta, q_c, do_c = dq(q, k, v, pos, ok, seg, o, lse, do)
        dkv = jax.jit(lambda *a, st=st: gpu._dkv(*a, st))
        record(fraction, "dkv", median_ms(
            lambda: dkv(q_c, k, v, pos, count, ok, seg, lse, delta, do_c)), bs)
      except Exception as e:  # noqa: BLE001 -- a setting that does not compile is skipped
        print(f"failed {bs}: {type(e).__name__}: {str(e)[:200]}", flush=True)
  best = {}
  for r in rows:
    key = f"{r['fraction']}/{r['stage']}"
    if key not in best or r["ms"] < best[key]["ms"]:
      best[key] = r
  print("\nbest per stage:")
  for key, r in best.items():
    print(f"  {key:<20} {r['ms']:.3f} ms  {r}")
  name = jax.devices()[0].device_kind.lower().replace(" ", "_")
  out = os.path.join(os.path.dirname(__file__), "results",
                     f"selective_attention_tune_{name}.json")
  with open(os.environ.get("OUT_JSON", out), "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "shape": [b, l, h, d], "window": w, "rows": rows, "best": best}, f, indent=1)


if __name__ == "__main__":
  main()
