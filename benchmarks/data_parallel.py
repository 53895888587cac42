r"""Data-parallel scaling of a training step: one device against all devices of the host.

The anchor is the same step on one device of the same machine. Each device gets the same
rows (`--batch_per_device` x `--seq_len` tokens), so perfect scaling multiplies tokens/s by
the device count; the printed efficiency is tokens/s on N / (N x tokens/s on one). Batches
are random tokens made once on the devices, so the figure is the step's own (the input
pipeline is timed by benchmarks/train_text.py).

    python benchmarks/data_parallel.py --config=taipan_190m --dtype=bfloat16   # 2 x H200
    python benchmarks/data_parallel.py --config=tiny --seq_len=64 --iters=3     # CPU smoke
Writes benchmarks/results/data_parallel_<config>_<device>.json.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

import taipan_jax
from report import write_result
from taipan_jax.training import partition
from taipan_jax.training.step import make_steps


def tokens_per_second(name, devices, args) -> dict:
  n = len(devices)
  cfg = taipan_jax.load_config(name, {
      "model.dtype": args.dtype, "data.seq_len": args.seq_len,
      "train.batch_size": args.batch_per_device * n, "mesh.data": n})
  steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=0, gumbel=1)))
  plan = partition.make_plan(cfg, steps.abstract_state, devices)
  state = partition.init_state(steps, plan)
  step = partition.jit_train_step(steps, plan)
  shape = (cfg.train.batch_size, cfg.data.seq_len)
  tokens = jax.random.randint(jax.random.key(0), shape, 0, cfg.model.vocab_size, jnp.int32)
  batch = jax.device_put({"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
                          "loss_mask": jnp.ones(shape, jnp.float32),
                          "segment_ids": jnp.ones(shape, jnp.int32)}, plan.batch)
  start = time.perf_counter()
  for _ in range(args.warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_and_warmup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(args.iters):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / args.iters
  row = {"devices": n, "batch": shape[0], "seq_len": shape[1], "step_seconds": seconds,
         "tokens_per_second": shape[0] * shape[1] / seconds, "loss": float(metrics["loss"]),
         "compile_and_warmup_seconds": compile_and_warmup}
  print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                  for k, v in row.items()), flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="taipan_190m")
  parser.add_argument("--batch_per_device", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  devices = jax.devices()
  one = tokens_per_second(args.config, devices[:1], args)
  everyone = tokens_per_second(args.config, devices, args)
  efficiency = everyone["tokens_per_second"] / (len(devices) * one["tokens_per_second"])
  print(f"{args.config}: {one['tokens_per_second']:,.0f} tokens/s on 1 device, "
        f"{everyone['tokens_per_second']:,.0f} on {len(devices)}: speedup "
        f"{everyone['tokens_per_second'] / one['tokens_per_second']:.2f}x, "
        f"scaling efficiency {efficiency:.3f}")
  write_result(args.out, f"data_parallel_{args.config}", {
      "benchmark": "data_parallel", "device": devices[0].device_kind,
      "device_count": len(devices), "jax": jax.__version__, "config": args.config,
      "dtype": args.dtype, "rows": [one, everyone], "scaling_efficiency": efficiency})


if __name__ == "__main__":
  main()
