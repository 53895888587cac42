r"""The chunked SSD on one GPU: our Pallas kernels against XLA and the fastest peer kernels.

Times forward and forward+backward (the backward of sum(y * dy) with respect to x, dt, A, B,
C) of:
  pallas     taipan_jax's Pallas Triton kernels (pallas_kernels/ssd/gpu.py)
  xla        our XLA chunked SSD (ops.ssd implementation='xla'), chunk 256
  mamba_ssm  mamba_ssm's Triton `mamba_chunk_scan_combined`, chunk 256 (if importable)
  fla        flash-linear-attention's `chunk_simple_gla` (if importable): the same recurrence
             with q = C, k = B, v = x dt, g = dt A. It is timed on those native inputs with
             B and C already repeated per head, so the preparation it needs is not counted.
All run on the same bf16 inputs in the same process; every output is compared with the fp32
sequential reference (pallas_kernels.ssd.ssd_reference) on the same inputs.

    python benchmarks/ssd.py                      # the three shapes below
    python benchmarks/ssd.py --shapes=first --reps=5
    python benchmarks/ssd.py --baseline=chunk_bwd=32,chunk_grad=None   # and a second setting
`--block_sizes` and `--baseline` are BlockSizes fields over the defaults
(BlockSizes.for_backend("gpu")); with --baseline the kernels also run at that setting, as
the row pallas_baseline, in the same process.
Shapes (batch, seq, heads, head_dim, groups, d_state):
  first   8 x 4096,  24 x 64, 1 x 128  (Taipan 190M's layer at the issue's batch)
  long    2 x 16384, 24 x 64, 1 x 128
  1.3b    4 x 4096,  64 x 64, 1 x 128  (Taipan 1.3B's layer)
Writes benchmarks/results/ssd_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")   # leave room for torch

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import ssd_gpu, ssd_reference
from ssd_settings import parse_block_sizes
from timing import median_ms
from taipan_jax import ops

SHAPES = {"first": (8, 4096, 24, 64, 1, 128), "long": (2, 16384, 24, 64, 1, 128),
          "1.3b": (4, 4096, 64, 64, 1, 128)}


H100_BF16_FLOPS = 989e12      # dense bf16 tensor-core peak, H100 SXM
H100_BYTES_PER_S = 3.35e12    # HBM3


def roofline_work(shape, chunk=256):
  """FLOPs and bytes of one forward (the issue's count): C B^T once per group, the
  intra-chunk product over full chunks, chunk states and the off-diagonal output; reading
  x, dt, B, C (bf16, dt fp32) and writing y once."""
  b, l, h, p, g, n = shape
  flops = 2 * b * l * chunk * n * g + 2 * b * h * l * chunk * p + 4 * b * h * l * p * n
  bytes_moved = 2 * (2 * b * l * h * p + 2 * b * l * g * n) + 4 * b * l * h
  return flops, bytes_moved


def make_inputs(shape, seed=0):
  b, l, h, p, g, n = shape
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  bf = jnp.bfloat16
  x = jax.random.normal(k[0], (b, l, h, p), bf)
  dt = jax.nn.softplus(jax.random.normal(k[1], (b, l, h)) - 2.0)           # fp32, as Mamba-2
  A = -jnp.exp(jax.random.uniform(k[2], (h,), minval=0.0, maxval=np.log(16.0)))
  B = jax.random.normal(k[3], (b, l, g, n), bf)
  C = jax.random.normal(k[4], (b, l, g, n), bf)
  dy = jax.random.normal(k[5], (b, l, h, p), bf)
  return x, dt, A, B, C, dy


def jax_fns(impl, block_sizes):
  if impl.startswith("pallas"):
    forward = lambda x, dt, A, B, C: ssd_gpu(x, dt, A, B, C, block_sizes=block_sizes)[0]
  else:
    forward = lambda x, dt, A, B, C: ops.ssd(x, dt, A, B, C, chunk_size=256,
                                             implementation="xla")

  def fwd_bwd(x, dt, A, B, C, dy):
    y, vjp = jax.vjp(forward, x, dt, A, B, C)
    return y, vjp(dy)

  return jax.jit(forward), jax.jit(fwd_bwd)


def bench_jax(impl, inputs, reps, block_sizes):
  """(y, forward seconds, forward+backward seconds)."""
  x, dt, A, B, C, dy = inputs
  fwd, fb = jax_fns(impl, block_sizes)
  return (fwd(x, dt, A, B, C), median_ms(lambda: fwd(x, dt, A, B, C), reps) / 1e3,
          median_ms(lambda: fb(x, dt, A, B, C, dy), reps) / 1e3)


def torch_peers():
  peers = {}
  try:
    import torch
  except ImportError:
    return peers, None
  try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    import mamba_ssm
    peers["mamba_ssm"] = (mamba_chunk_scan_combined, mamba_ssm.__version__)
  except Exception as e:  # noqa: BLE001 -- any import failure means: not available here
    print(f"mamba_ssm unavailable: {type(e).__name__}: {e}")
  try:
    from fla.ops.simple_gla import chunk_simple_gla
    import fla
    peers["fla"] = (chunk_simple_gla, getattr(fla, "__version__", "?"))
  except Exception as e:  # noqa: BLE001
    print(f"fla unavailable: {type(e).__name__}: {e}")
  return peers, torch


def bench_torch(name, fn, torch, inputs, reps):
  x, dt, A, B, C, dy = (torch.from_numpy(np.asarray(t.astype(jnp.float32))).cuda()
                        for t in inputs)
  bf = torch.bfloat16
  x, B, C, dy = x.to(bf), B.to(bf), C.to(bf), dy.to(bf)
  h = x.shape[2]
  if name == "mamba_ssm":
    args = [x, dt, A, B, C]
    call = lambda *a: fn(*a, chunk_size=256)
  else:
    rep = h // B.shape[2]
    q = C.repeat_interleave(rep, dim=2).contiguous()
    k = B.repeat_interleave(rep, dim=2).contiguous()
    v = (x.float() * dt[..., None]).to(bf)
    g = (dt * A).contiguous()
    args = [q, k, v, g]
    call = lambda q, k, v, g: fn(q, k, v, g=g, scale=1.0)[0]
  for t in args:
    t.requires_grad_(True)

  def fwd():
    with torch.no_grad():
      return call(*args)

  def fwd_bwd():
    for t in args:
      t.grad = None
    call(*args).backward(dy)

  sync = lambda _: torch.cuda.synchronize()
  y = fwd()
  return (jnp.asarray(y.float().cpu().numpy()), median_ms(fwd, reps, sync=sync) / 1e3,
          median_ms(fwd_bwd, reps, sync=sync) / 1e3)


def reference(inputs):
  x, dt, A, B, C, _ = inputs
  f32 = lambda t: t.astype(jnp.float32)
  y, _ = jax.jit(ssd_reference)(f32(x), dt, A, f32(B), f32(C))
  return y


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default="first,long,1.3b")
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--out", default=None)
  parser.add_argument("--block_sizes", default="", help="BlockSizes fields over the defaults")
  parser.add_argument("--baseline", default=None,
                      help="BlockSizes fields of a second pallas row, pallas_baseline")
  args = parser.parse_args()
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise SystemExit(f"benchmarks/ssd.py times GPU kernels; this backend is {device.platform!r}")
  block_sizes = parse_block_sizes(args.block_sizes)
  settings = {"pallas": block_sizes, "xla": block_sizes}
  if args.baseline is not None:
    settings["pallas_baseline"] = parse_block_sizes(args.baseline)
  peers, torch = torch_peers()
  results = {"device": device.device_kind, "jax": jax.__version__,
             "python": platform.python_version(),
             "block_sizes": dataclasses.asdict(block_sizes),
             "baseline_block_sizes": (dataclasses.asdict(settings["pallas_baseline"])
                                      if args.baseline is not None else None),
             "versions": {name: v for name, (_, v) in peers.items()}, "rows": []}
  if torch is not None:
    import triton
    results["versions"].update(torch=torch.__version__, triton=triton.__version__)
  for shape_name in args.shapes.split(","):
    shape = SHAPES[shape_name]
    inputs = make_inputs(shape)
    y_ref = reference(inputs)
    scale = float(jnp.sqrt(jnp.mean(y_ref ** 2)))
    rows = []
    for impl, bs in settings.items():
      y, fwd_s, fb_s = bench_jax(impl, inputs, args.reps, bs)
      rows.append((impl, fwd_s, fb_s, y))
      print(f"  {shape_name} {impl}: {fwd_s * 1e3:.3f} / {fb_s * 1e3:.3f} ms", flush=True)
    for name, (fn, _) in peers.items():
      try:
        y, fwd_s, fb_s = bench_torch(name, fn, torch, inputs, args.reps)
      except Exception as e:  # noqa: BLE001 -- report and go on with the others
        print(f"{name} failed at {shape_name}: {type(e).__name__}: {e}")
        continue
      rows.append((name, fwd_s, fb_s, y))
      print(f"  {shape_name} {name}: {fwd_s * 1e3:.3f} / {fb_s * 1e3:.3f} ms (first calls "
            "include Triton autotuning; timings are after them)", flush=True)
    ours_f, ours_fb = rows[0][1], rows[0][2]
    flops, bytes_moved = roofline_work(shape)
    t_roof = max(flops / H100_BF16_FLOPS, bytes_moved / H100_BYTES_PER_S)
    print(f"roofline fwd: {flops / 1e9:.1f} GFLOP, {bytes_moved / 1e6:.0f} MB -> "
          f"{t_roof * 1e3:.3f} ms; ours reaches {t_roof / ours_f:.1%} of it")
    results.setdefault("roofline", {})[shape_name] = {
        "gflop": flops / 1e9, "mb": bytes_moved / 1e6, "ms": t_roof * 1e3,
        "fraction_fwd": t_roof / ours_f}
    print(f"\nshape {shape_name} {shape} bf16; error = max |y - y_fp32_reference| / rms(y_ref)")
    print(f"{'implementation':<12}{'fwd ms':>9}{'fwd+bwd ms':>12}{'fwd vs ours':>13}"
          f"{'f+b vs ours':>13}{'max error':>11}")
    for impl, fwd_s, fb_s, y in rows:
      err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - y_ref))) / scale
      print(f"{impl:<12}{fwd_s * 1e3:>9.3f}{fb_s * 1e3:>12.3f}{fwd_s / ours_f:>13.2f}"
            f"{fb_s / ours_fb:>13.2f}{err:>11.2e}")
      results["rows"].append({"shape": shape_name, "dims": shape, "implementation": impl,
                              "fwd_ms": fwd_s * 1e3, "fwd_bwd_ms": fb_s * 1e3,
                              "fwd_ratio_to_ours": fwd_s / ours_f,
                              "fwd_bwd_ratio_to_ours": fb_s / ours_fb, "max_error": err})
    del inputs, rows
    name = device.device_kind.lower().replace(" ", "_")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"ssd_{name}.json")
    with open(out, "w") as f:          # after every shape, so a cut-off run keeps its rows
      json.dump(results, f, indent=1)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
  main()
