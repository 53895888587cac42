r"""Per-device memory of a training run: the estimator (taipan_jax.training.memory) against
the peak the device reports after running the same steps.

    python benchmarks/memory.py --configs=taipan_190m --batch_size=4 [--steps=3]
On a backend without memory statistics (the CPU) only the estimate is printed. Writes
benchmarks/results/memory_<device>.json.
"""
from __future__ import annotations

import argparse
import os

import jax
from flax import nnx

import taipan_jax
from report import write_result
from taipan_jax.data import make_train_iterator
from taipan_jax.training.memory import estimate_training_memory
from taipan_jax.training import partition
from taipan_jax.training.step import make_steps

GIB = 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="taipan_190m")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  device = jax.devices()[0]
  rows = []
  for name in args.configs.split(","):
    cfg = taipan_jax.load_config(name, {"train.batch_size": args.batch_size,
                                        "data.seq_len": args.seq_len,
                                        "model.dtype": args.dtype})
    steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(0)))
    plan = partition.make_plan(cfg, steps.abstract_state)
    est = estimate_training_memory(cfg, steps, plan)
    row = {"config": name, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "dtype": args.dtype, "params_gib": est.params / GIB,
           "optimizer_gib": est.optimizer / GIB,
           "step_temporaries_gib": est.step_temporaries / GIB,
           "temporaries_per_token_kib": est.temporaries_per_token / 1024,
           "estimate_gib": est.total / GIB}
    if args.steps and device.memory_stats():
      state = partition.init_state(steps, plan)
      step = partition.jit_train_step(steps, plan)
      data = make_train_iterator(cfg)
      for _ in range(args.steps):
        state, metrics = step(state, jax.device_put(next(data), plan.batch))
      jax.block_until_ready(metrics)
      peak = device.memory_stats()["peak_bytes_in_use"]
      row.update(measured_peak_gib=peak / GIB, estimate_over_measured=est.total / peak)
      del state
    print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()), flush=True)
    rows.append(row)
  write_result(os.path.join(os.path.dirname(__file__), "results"), "memory",
               {"device": device.device_kind, "jax": jax.__version__, "rows": rows})


if __name__ == "__main__":
  main()
