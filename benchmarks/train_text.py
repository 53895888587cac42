r"""Training throughput of the 190M models on local text: Taipan against its anchors.

Trains a SentencePiece tokenizer on the Python standard library's source (present on every
machine), then runs `taipan train` on it for each config in its own process (so each has
its own peak memory), and reads tokens/s, MFU and peak memory back from the run's
metrics.jsonl. The anchors are the baselines a user would train instead: Mamba-2 and
Transformer++ of the same size, same data, same step.

    python benchmarks/train_text.py                       # H100: 190M x3, 8 x 4096, 200 steps
    python benchmarks/train_text.py --configs=tiny --steps=20 --seq_len=128 --batch_size=8 \
        --vocab_size=512                                  # a CPU smoke run
Writes benchmarks/results/train_text_<device>.json.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import sysconfig
import time

import jax

from report import write_result


def stdlib_glob() -> str:
  return os.path.join(sysconfig.get_paths()["stdlib"], "*.py")


def run_config(name, args, tokenizer, workdir, kernel="auto") -> dict:
  cmd = [sys.executable, "-m", "taipan_jax.cli", "train", f"--config={name}",
         f"--workdir={workdir}", "--config.data.task=text",
         f"--config.data.path={stdlib_glob()}", f"--config.data.tokenizer={tokenizer}",
         f"--config.model.vocab_size={args.vocab_size}", f"--config.model.dtype={args.dtype}",
         f"--config.data.seq_len={args.seq_len}", f"--config.train.batch_size={args.batch_size}",
         f"--config.train.grad_accum_steps={args.grad_accum}",
         f"--config.train.steps={args.steps}", f"--config.train.log_every={args.log_every}",
         "--config.train.eval_every=0", "--config.train.eval_batches=2",
         "--config.train.checkpoint_every=0", f"--config.data.read_threads={args.read_threads}",
         "--config.optim.warmup_steps=50", f"--config.mamba.kernel={kernel}",
         f"--config.sal.kernel={kernel}"]
  start = time.perf_counter()
  out = subprocess.run(cmd, capture_output=True, text=True)
  wall = time.perf_counter() - start
  print(out.stdout[-3000:])
  if out.returncode:
    print(out.stderr[-5000:])
    raise SystemExit(f"{name} failed")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train_rows = [r for r in rows if "tokens_per_second" in r and r["step"] > args.log_every]
  rates = sorted(r["tokens_per_second"] for r in train_rows)
  mfus = sorted(r["mfu"] for r in train_rows if "mfu" in r)
  peak = [r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r]
  losses = [r["loss"] for r in rows if "loss" in r]
  evals = [r for r in rows if "eval/loss" in r]
  return {"config": name, "kernel": kernel, "tokens_per_second": rates[len(rates) // 2],
          "mfu": mfus[len(mfus) // 2] if mfus else None,
          "peak_memory_gib": peak[-1] if peak else None,
          "loss_first": losses[0], "loss_last": losses[-1],
          "eval_loss": evals[-1]["eval/loss"] if evals else None,
          "step_seconds": sorted(r["step_seconds"] for r in train_rows)[len(train_rows) // 2],
          "wall_seconds": wall, "steps": args.steps}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="taipan_190m,mamba2_190m,transformer_190m")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--grad_accum", type=int, default=1)
  parser.add_argument("--vocab_size", type=int, default=32000)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--log_every", type=int, default=25)
  parser.add_argument("--read_threads", type=int, default=8)
  parser.add_argument("--workdir", default="/tmp/taipan_train_text")
  parser.add_argument("--results_dir", default="benchmarks/results")
  parser.add_argument("--kernels", default="auto",
                      help="kernel implementations to run each config with (mamba.kernel and "
                           "sal.kernel), e.g. "
                           "pallas,xla; results go to train_text_kernels_<device>.json")
  args = parser.parse_args()

  os.makedirs(args.workdir, exist_ok=True)
  prefix = os.path.join(args.workdir, f"spm{args.vocab_size}")
  if not os.path.exists(prefix + ".model"):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "taipan_jax.cli", "tokenizer", "train",
                    f"--input={stdlib_glob()}", f"--vocab_size={args.vocab_size}",
                    f"--output={prefix}"], check=True)
    print(f"tokenizer: {time.perf_counter() - t0:.0f}s")
  files = glob.glob(stdlib_glob())
  corpus_mb = sum(os.path.getsize(f) for f in files) / 1e6

  results = []
  for name in args.configs.split(","):
    for kernel in args.kernels.split(","):
      workdir = os.path.join(args.workdir, f"{name}_{kernel}_{int(time.time())}")
      results.append(run_config(name, args, prefix + ".model", workdir, kernel))
      print(json.dumps(results[-1]))

  device = jax.devices()[0]
  base = results[0]
  for r in results[1:]:
    print(f"{base['config']}[{base['kernel']}] / {r['config']}[{r['kernel']}]: "
          "tokens/s ratio "
          f"{base['tokens_per_second'] / r['tokens_per_second']:.3f}")
  record = {"benchmark": "train_text", "device": device.device_kind,
            "platform": device.platform, "jax": jax.__version__,
            "python": platform.python_version(),
            "data": f"Python {platform.python_version()} stdlib *.py ({len(files)} files, "
                    f"{corpus_mb:.1f} MB), SentencePiece BPE {args.vocab_size}",
            "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
            "grad_accum": args.grad_accum, "results": results}
  write_result(args.results_dir,
               "train_text" if args.kernels == "auto" else "train_text_kernels", record)


if __name__ == "__main__":
  main()
