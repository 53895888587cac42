r"""Context-parallel long-context evaluation: one long document on one device against its
length split over all the host's devices.

Both runs go through `taipan_jax.inference.long_context.stream_nll` (the `taipan eval
--long_context` path): `mesh=None` keeps each segment on one device (the anchor), a mesh with
a 'sequence' axis over every device splits each segment's length between them, each device
taking its predecessor's conv inputs, SSD state and SAL keys. With `--segment_len` equal to
`--tokens` the document is one segment, so the split is the whole of the parallelism. The
NLLs of the two runs are compared token by token.

    python benchmarks/context_parallel_eval.py --config=taipan_190m --tokens=262144  # 2 x H200
    XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python benchmarks/context_parallel_eval.py --config=tiny --tokens=4096 --reps=1  # CPU
Writes benchmarks/results/context_parallel_eval_<config>_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import taipan_jax
from report import write_result
from taipan_jax.inference.long_context import stream_nll


def timed(model, tokens, segment_len, mesh, reps) -> tuple[float, np.ndarray]:
  """(median seconds of `reps` evaluations after a compiling one, the NLLs)."""
  nll = stream_nll(model, tokens, segment_len=segment_len, mesh=mesh, log=None)
  seconds = []
  for _ in range(reps):
    start = time.perf_counter()
    nll = stream_nll(model, tokens, segment_len=segment_len, mesh=mesh, log=None)
    seconds.append(time.perf_counter() - start)
  return float(np.median(seconds)), nll


def peak_gib(devices) -> list[float]:
  return [round((d.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30, 3)
          for d in devices]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="taipan_190m")
  parser.add_argument("--tokens", type=int, default=1 << 18)
  parser.add_argument("--segment_lens", default="262144,65536",
                      help="comma-separated; each is timed on one device and on all")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  devices = jax.devices()
  if len(devices) < 2:
    raise SystemExit(f"context parallelism needs >= 2 devices; this host has {len(devices)} "
                     "(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2)")
  cfg = taipan_jax.load_config(args.config, {"model.dtype": args.dtype})
  model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, args.tokens + 1)
  mesh = Mesh(np.asarray(devices), ("sequence",))
  record = {"benchmark": "context_parallel_eval", "device": devices[0].device_kind,
            "devices": len(devices), "jax": jax.__version__, "config": args.config,
            "dtype": args.dtype, "tokens": args.tokens, "rows": []}
  for segment_len in (int(s) for s in args.segment_lens.split(",")):
    one_s, one_nll = timed(model, tokens, segment_len, None, args.reps)
    one_peak = peak_gib(devices[:1])
    all_s, all_nll = timed(model, tokens, segment_len, mesh, args.reps)
    row = {"segment_len": segment_len, "seconds_1_device": one_s,
           f"seconds_{len(devices)}_devices": all_s, "speedup": one_s / all_s,
           "tokens_per_second_1_device": args.tokens / one_s,
           f"tokens_per_second_{len(devices)}_devices": args.tokens / all_s,
           "mean_nll": float(one_nll.mean()),
           # bf16 can flip a SAL selection near the threshold: a few tokens differ visibly.
           "max_abs_nll_difference": float(np.abs(one_nll - all_nll).max()),
           "mean_abs_nll_difference": float(np.abs(one_nll - all_nll).mean()),
           "peak_gib_after_1_device_run": one_peak,
           "peak_gib_after_split_run": peak_gib(devices)}
    record["rows"].append(row)
    print(f"{args.config} {args.tokens:,} tokens, segments of {segment_len:,}: "
          f"1 device {one_s:.3f} s, {len(devices)} devices {all_s:.3f} s, "
          f"speedup {one_s / all_s:.2f}x; max |NLL difference| "
          f"{row['max_abs_nll_difference']:.2e} (mean {row['mean_abs_nll_difference']:.1e}); "
          f"peak GiB {row['peak_gib_after_split_run']}", flush=True)
  write_result(args.out, f"context_parallel_eval_{args.config}", record)


if __name__ == "__main__":
  main()
