r"""Time one training step (forward + backward + AdamW) of a config against its anchor.

The anchor is the same stack with every SAL replaced by a Mamba-2 block: what the SALs cost
over the pure Mamba-2 model a user would otherwise train.

    python benchmarks/train_step.py --config=tiny            # the config's batch and length
    python benchmarks/train_step.py --config=taipan_190m --batch_size=4 --seq_len=2048 \
        --dtype=bfloat16
Writes benchmarks/results/train_step_<config>_<dtype>_<device kind>.json (report.py).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import jax
from flax import nnx

import taipan_jax
from taipan_jax.data import make_train_iterator
from taipan_jax.training.step import make_steps
from report import write_result


def time_steps(cfg, warmup: int, iters: int) -> dict:
  steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=0, gumbel=1)))
  state = jax.jit(steps.init_state)()
  params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  train_step = jax.jit(steps.train_step, donate_argnums=0)
  data = make_train_iterator(cfg)
  batches = [jax.device_put(next(data)) for _ in range(4)]   # data cost kept out of timing
  compile_start = time.perf_counter()
  for step in range(warmup):
    state, metrics = train_step(state, batches[step % 4])
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - compile_start
  times = []
  for step in range(warmup, warmup + iters):
    t0 = time.perf_counter()
    state, metrics = train_step(state, batches[step % 4])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  times.sort()
  return {"median_ms": 1e3 * times[len(times) // 2], "min_ms": 1e3 * times[0],
          "warmup_s": compile_s, "params": params, "loss_last": float(metrics["loss"])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny")
  parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
  parser.add_argument("--seq_len", type=int, default=None, help="default: the config's")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  over = {"model.dtype": args.dtype}
  if args.batch_size:
    over["train.batch_size"] = args.batch_size
  if args.seq_len:
    over["data.seq_len"] = args.seq_len
  cfg = taipan_jax.load_config(args.config, over)
  args.batch_size, args.seq_len = cfg.train.batch_size, cfg.data.seq_len
  anchor_pattern = cfg.model.pattern.replace("s", "m").replace("a", "m")
  anchor = taipan_jax.load_config(args.config, {**over, "model.pattern": anchor_pattern,
                                                "loss.budget_weight": 0.0})
  ours = time_steps(cfg, args.warmup, args.iters)
  base = time_steps(anchor, args.warmup, args.iters)
  device = jax.devices()[0]
  result = {
      "benchmark": "train_step", "config": args.config, "batch_size": args.batch_size,
      "seq_len": args.seq_len, "dtype": args.dtype, "device": device.device_kind,
      "platform": device.platform, "jax": jax.__version__, "python": platform.python_version(),
      "taipan": ours, "anchor_mamba2_only": base,
      "ratio_taipan_over_anchor": ours["median_ms"] / base["median_ms"],
  }
  print(f"{args.config} ({args.dtype}, batch {args.batch_size} x {args.seq_len}) train step "
        f"on {device.device_kind} (jax {jax.__version__}): {ours['median_ms']:.2f} ms; "
        f"Mamba-2-only anchor {base['median_ms']:.2f} ms; "
        f"ratio {result['ratio_taipan_over_anchor']:.2f}")
  write_result(args.out, f"train_step_{args.config}_{args.dtype}", result)


if __name__ == "__main__":
  main()
