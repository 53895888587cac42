r"""Where a training step's time goes: tokens/s, MFU and a device-time table by part.

For each config (default the three 190M models: Taipan, Mamba-2, Transformer++; same code,
the config's vocabulary of 128,256) and each LM-head variant (`--ce_chunks`: 0 is the unfused
head over full logits, N > 0 the fused head of ops.linear_cross_entropy with N positions a
step), one train step (forward, backward, AdamW) on random tokens is compiled ahead of time
and timed over `--iters` steps, each waited for and then back to back as a training loop
dispatches them (tokens/s and MFU are from the latter). Then `--trace_steps` more are traced
with jax.profiler. Each device kernel of the trace is named by its HLO instruction, whose
op_name puts it in one part. The op_names carry named scopes that this script wraps around
the ops the models call (`scoped_ops`: the library itself is not changed); the backward pass
keeps its forward's scope:

  ssd        ops.ssd (the Pallas kernels or the XLA path)
  attention  ops.selective_window_attention: the SALs' and Transformer++'s attention
  head+loss  the final norm, LM head and cross-entropy (ops.linear_cross_entropy, or
             LanguageModel.logits and the step's optax loss)
  matmuls    the other matrix products (projections, SwiGLU)
  optimizer  what the step does after the gradients: AdamW, clipping, the norm, the
             non-finite guard (ops outside the micro-batch scan)
  other      norms, convolution, activations, selection, residual adds, copies
  host/idle  the traced steps' wall time minus the kernels' summed time (launch gaps, host)

On a GPU XLA runs the step as command buffers (CUDA graphs), whose kernels the trace does
not tie to HLO instructions: for the table, run with command buffers off,
XLA_FLAGS=--xla_gpu_enable_command_buffer= (each kernel then launched on its own; the step
time of that mode is reported with it). Tokens/s and MFU are for the default mode.

    python benchmarks/train_profile.py                             # H100/H200: 3 models x 2
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python benchmarks/train_profile.py \
        --configs=taipan_190m,mamba2_190m:512,transformer_190m:512 --stem=train_profile_kernels
    python benchmarks/train_profile.py --configs=tiny --batch_size=2 --seq_len=64 --iters=2
    python benchmarks/train_profile.py --configs=taipan_190m:512 \
        --ssd_block_sizes=chunk_bwd=128,chunk_grad=32 --stem=train_profile_ssd_sub
`--ssd_block_sizes` sets the GPU SSD kernels' BlockSizes fields over their defaults for the
whole run (benchmarks/ssd_settings.py), so two runs on one machine compare two settings.
Writes benchmarks/results/train_profile_<device>.json: the table, and per config the 60
costliest HLO instructions with their metadata (re-categorise offline with `categorise`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import glob
import os
import re
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import taipan_jax
from taipan_jax.training.flops import peak_flops_per_second, train_flops_per_token
from taipan_jax.training.step import make_steps
from report import result_path, write_result
from ssd_settings import parse_block_sizes, use_on_gpu

PARTS = ("ssd", "attention", "head+loss", "matmuls", "optimizer", "other")
_METADATA = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"')
_SCOPES = {"ssd": "prof_ssd", "attention": "prof_attention", "head+loss": "prof_head_loss"}


def scoped_ops():
  """Wraps the ops the models and the step call in jax.named_scope, so the compiled HLO's
  op_names say which part each instruction belongs to (the modules look the ops up as
  `ops.name` at call time)."""
  import taipan_jax.models.lm as lm
  import taipan_jax.training.step as step
  from taipan_jax import ops

  def scope(fn, name):
    def wrapped(*a, **k):
      with jax.named_scope(name):
        return fn(*a, **k)
    return wrapped

  ops.ssd = scope(ops.ssd, "prof_ssd")
  ops.selective_window_attention = scope(ops.selective_window_attention, "prof_attention")
  ops.linear_cross_entropy = scope(ops.linear_cross_entropy, "prof_head_loss")
  lm.LanguageModel.cross_entropy_sums = scope(lm.LanguageModel.cross_entropy_sums,
                                              "prof_head_loss")
  lm.LanguageModel.logits = scope(lm.LanguageModel.logits, "prof_head_loss")
  step._token_sums = scope(step._token_sums, "prof_head_loss")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its op_name metadata."""
  out = {}
  for line in hlo_text.splitlines():
    m = _METADATA.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def categorise(op_name: str, kernel: str) -> str:
  """One of PARTS for a device kernel, from its HLO instruction's op_name (and the kernel's
  name where the op_name is empty)."""
  for part, tag in _SCOPES.items():
    if tag in op_name:
      return part
  if op_name and "/while/" not in op_name:      # after the micro-batch scan: the update
    return "optimizer"
  if "dot_general" in op_name or any(k in kernel.lower()
                                     for k in ("gemm", "nvjet", "xmma", "cutlass", "cublas")):
    return "matmuls"
  return "other"


def device_events(trace_dir: str):
  """(hlo_op, kernel name, duration_ns) of every device kernel in the trace."""
  from jax.profiler import ProfileData
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  events = {"device": [], "host": []}     # on a CPU the HLO ops run on host threads
  for plane in ProfileData.from_file(sorted(paths)[-1]).planes:
    where = "device" if plane.name.startswith("/device:") else "host"
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" in stats:
          events[where].append((stats["hlo_op"], e.name, e.duration_ns))
  return events["device"] or events["host"]


def random_batch(cfg, seed):
  rng = np.random.default_rng(seed)
  b, l = cfg.train.batch_size, cfg.data.seq_len
  tokens = rng.integers(1, cfg.model.vocab_size, (b, l + 1)).astype(np.int32)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((b, l), np.float32), "segment_ids": np.ones((b, l), np.int32)}


def profile_config(cfg, args) -> dict:
  steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=0, gumbel=1)))
  state = jax.jit(steps.init_state)()
  batches = [jax.device_put(random_batch(cfg, i)) for i in range(3)]
  start = time.perf_counter()
  compiled = jax.jit(steps.train_step, donate_argnums=0).lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  names = hlo_op_names(compiled.as_text())
  for i in range(args.warmup):
    state, metrics = compiled(state, batches[i % 3])
  jax.block_until_ready((state, metrics))
  times = []
  for i in range(args.iters):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batches[i % 3])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  # As a training loop runs: steps dispatched back to back, one wait at the end.
  t0 = time.perf_counter()
  for i in range(args.iters):
    state, metrics = compiled(state, batches[i % 3])
  jax.block_until_ready((state, metrics))
  back_to_back_s = (time.perf_counter() - t0) / args.iters
  trace_dir = tempfile.mkdtemp(prefix="train_profile_")
  jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  for i in range(args.trace_steps):
    state, metrics = compiled(state, batches[i % 3])
  jax.block_until_ready((state, metrics))
  traced_s = (time.perf_counter() - t0) / args.trace_steps
  jax.profiler.stop_trace()
  by_op: dict[str, list] = {}
  for op, kernel, ns in device_events(trace_dir):
    entry = by_op.setdefault(op, [kernel, 0.0, 0])
    entry[1] += ns / 1e6 / args.trace_steps
    entry[2] += 1
  shutil.rmtree(trace_dir, ignore_errors=True)
  parts = dict.fromkeys(PARTS, 0.0)
  # Without command buffers hlo_op names the instruction; a kernel inside a command buffer
  # is matched by its own name, which is the fusion's with '.' written '_'.
  op_name = lambda op, kernel: names.get(op) or names.get(re.sub(r"_(\d+)$", r".\1", kernel), "")
  for op, (kernel, ms, _) in by_op.items():
    parts[categorise(op_name(op, kernel), kernel)] += ms
  kernels_ms = sum(parts.values())
  parts["host/idle"] = max(traced_s * 1e3 - kernels_ms, 0.0)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  peak = peak_flops_per_second(jax.devices()[0], cfg.model.dtype)
  flops = train_flops_per_token(cfg, cfg.data.seq_len)
  top = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:60]
  stats = jax.devices()[0].memory_stats() or {}
  return {
      "step_ms": 1e3 * step_s, "back_to_back_ms": 1e3 * back_to_back_s,
      "traced_step_ms": 1e3 * traced_s, "compile_s": compile_s,
      "tokens_per_second": tokens / back_to_back_s,
      "mfu": None if peak is None else tokens / back_to_back_s * flops / peak,
      "train_flops_per_token": flops, "loss": float(metrics["loss"]),
      "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
      "parts_ms": parts,
      "top_ops": [{"hlo_op": op, "kernel": k, "ms": ms, "launches": n,
                   "part": categorise(op_name(op, k), k), "op_name": op_name(op, k)}
                  for op, (k, ms, n) in top],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="taipan_190m,mamba2_190m,transformer_190m")
  parser.add_argument("--ce_chunks", default="0,512",
                      help="loss.ce_chunk values: 0 = unfused head, N = fused, N positions")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--trace_steps", type=int, default=3)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--stem", default="train_profile")
  parser.add_argument("--ssd_block_sizes", default="",
                      help="GPU SSD BlockSizes fields over the defaults, e.g. chunk_bwd=128")
  args = parser.parse_args()
  scoped_ops()
  ssd_block_sizes = parse_block_sizes(args.ssd_block_sizes)
  use_on_gpu(ssd_block_sizes)
  device = jax.devices()[0]
  record = {"benchmark": "train_profile", "device": device.device_kind, "jax": jax.__version__,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
            "data": "random tokens", "ssd_block_sizes": dataclasses.asdict(ssd_block_sizes),
            "runs": []}
  runs = []
  for entry in args.configs.split(","):      # "name" (every --ce_chunks) or "name:chunk"
    name, _, chunk = entry.partition(":")
    runs += [(name, int(c)) for c in (chunk or args.ce_chunks).split(",")]
  for name, chunk in runs:
    cfg = taipan_jax.load_config(name, {
        "model.dtype": args.dtype, "train.batch_size": args.batch_size,
        "data.seq_len": args.seq_len, "loss.ce_chunk": chunk})
    row = {"config": name, "ce_chunk": chunk, **profile_config(cfg, args)}
    record["runs"].append(row)
    mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
    print(f"{name} ce_chunk={chunk}: {row['back_to_back_ms']:.1f} ms/step back to back "
          f"({row['step_ms']:.1f} waiting for each), "
          f"{row['tokens_per_second']:,.0f} tokens/s, MFU {mfu}, "
          f"peak {row['peak_memory_gib']:.1f} GiB", flush=True)
    jax.clear_caches()
    with open(result_path(args.out, args.stem), "w") as f:    # kept if the run is cut off
      json.dump(record, f, indent=1)
  print(f"\n{'config':<18}{'chunk':>6}{'step ms':>9}{'tok/s':>9}{'MFU':>6}"
        + "".join(f"{p:>11}" for p in (*PARTS, "host/idle")))
  for r in record["runs"]:
    mfu = f"{100 * r['mfu']:.1f}" if r["mfu"] is not None else "-"
    print(f"{r['config']:<18}{r['ce_chunk']:>6}{r['back_to_back_ms']:>9.1f}"
          f"{r['tokens_per_second'] / 1e3:>8.1f}K{mfu:>6}"
          + "".join(f"{r['parts_ms'][p]:>11.2f}" for p in (*PARTS, "host/idle")))


if __name__ == "__main__":
  main()
