r"""Selective sliding-window attention on one GPU: our query-compacted kernels vs the anchors.

Times forward and forward+backward (d q, k, v of sum(out * dout)) of:
  pallas     taipan_jax's query-compacted Pallas Triton kernels
  cudnn      dense sliding-window attention, jax.nn.dot_product_attention(local_window_size=,
             implementation='cudnn'), all rows, masked afterwards (what the SAL costs without
             a sparse kernel)
  xla        our dense-blockwise XLA path (ops.selective_window_attention, 'xla')
  flex       torch FlexAttention over the compacted selected queries with a sliding-window
             mask_mod on their original positions (if torch has it)
  tokamax_*  tokamax.dot_product_attention's Triton / Mosaic-GPU kernels over the compacted
             selected queries with a per-query key range Mask(k_start, k_end) (if installed)
at batch 2, seq 16384, 12 heads, head_dim 64, window 2048, bf16, for selected fractions C in
{0.05, 0.15, 0.3, 1.0}, random and clustered. Errors are max |out - fp32 reference| over the
selected rows, relative to the reference's max.

    python benchmarks/selective_attention.py [--fractions=0.15 --reps=5]
Writes benchmarks/results/selective_attention_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")   # leave room for torch

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.selective_attention import selective_attention_gpu
from taipan_jax import ops
from timing import median_ms


def selection(kind, fraction, b, l, seed=0):
  rng = np.random.default_rng(seed)
  if kind == "random":
    return rng.random((b, l)) < fraction
  # Clustered: runs of 64 selected tokens, placed at random, covering the same fraction.
  sel = np.zeros((b, l), bool)
  runs = max(1, int(fraction * l / 64))
  for r in range(b):
    for s in rng.choice(l // 64, size=min(runs, l // 64), replace=False):
      sel[r, s * 64:(s + 1) * 64] = True
  return sel


def jax_impl(name, select, window):
  if name == "pallas":
    return lambda q, k, v: selective_attention_gpu(q, k, v, select, window=window)
  if name == "xla":
    return lambda q, k, v: ops.selective_window_attention(q, k, v, select, window=window,
                                                          implementation="xla")
  def cudnn(q, k, v):
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       local_window_size=(window - 1, 0),
                                       implementation="cudnn")
    return out * select[:, :, None, None].astype(out.dtype)
  return cudnn


def bench_jax(name, q, k, v, dout, select, window, reps):
  fn = jax_impl(name, select, window)
  fwd = jax.jit(fn)

  def fwd_bwd(q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout)

  fb = jax.jit(fwd_bwd)
  out = fwd(q, k, v)
  return out, median_ms(lambda: fwd(q, k, v), reps), median_ms(lambda: fb(q, k, v, dout), reps)


def bench_flex(q, k, v, dout, select, window, reps):
  import torch
  from torch.nn.attention.flex_attention import create_block_mask, flex_attention
  to = lambda t: torch.from_numpy(np.asarray(t.astype(jnp.float32))).cuda().to(torch.bfloat16)
  b, l, h, d = q.shape
  sel = np.asarray(select)
  counts = sel.sum(1)
  cap = int(-(-counts.max() // 128) * 128)
  pos = np.full((b, cap), 2**30, np.int64)
  for r in range(b):
    idx = np.nonzero(sel[r])[0]
    pos[r, :len(idx)] = idx
  pos_t = torch.from_numpy(pos).cuda()
  qt, kt, vt, dt = (to(t).transpose(1, 2).contiguous() for t in (q, k, v, dout))  # [b,h,l,d]
  gather = torch.from_numpy(np.minimum(pos, l - 1)).cuda()
  qc = torch.stack([qt[r][:, gather[r]] for r in range(b)]).contiguous()
  dc = torch.stack([dt[r][:, gather[r]] for r in range(b)]).contiguous()

  def mask_mod(bi, hi, qi, kj):
    p = pos_t[bi, qi]
    return (kj <= p) & (kj > p - window)

  block_mask = create_block_mask(mask_mod, b, None, cap, l, device="cuda")
  attend = torch.compile(flex_attention)
  for t in (qc, kt, vt):
    t.requires_grad_(True)

  def fwd():
    with torch.no_grad():
      return attend(qc, kt, vt, block_mask=block_mask)

  def fwd_bwd():
    for t in (qc, kt, vt):
      t.grad = None
    attend(qc, kt, vt, block_mask=block_mask).backward(dc)

  sync = lambda _: torch.cuda.synchronize()
  out_c = fwd().float().cpu().numpy()                      # [b, h, cap, d]
  out = np.zeros((b, l, h, d), np.float32)
  for r in range(b):
    n = counts[r]
    out[r, pos[r, :n]] = out_c[r, :, :n].transpose(1, 0, 2)
  return jnp.asarray(out), median_ms(fwd, reps, sync=sync), median_ms(fwd_bwd, reps, sync=sync)


def compacted_positions(select, multiple=128):
  """select: [b, l] bool (concrete) -> pos [b, cap] int32 (padding rows point at 0), counts."""
  sel = np.asarray(select)
  counts = sel.sum(1)
  cap = int(max(1, -(-counts.max() // multiple)) * multiple)
  pos = np.zeros((sel.shape[0], cap), np.int32)
  for r in range(sel.shape[0]):
    idx = np.nonzero(sel[r])[0]
    pos[r, :len(idx)] = idx
  return pos, counts


def bench_tokamax(backend, q, k, v, dout, select, window, reps):
  """The JAX-native anchor: the selected queries gathered outside the timed function (as for
  flex), each with its key range [pos - window + 1, pos + 1)."""
  try:
    import xprof  # noqa: F401
  except ImportError:
    # tokamax's package __init__ imports its profiler-based benchmarking helper, which needs
    # xprof (a 30 MB wheel); the attention kernels do not use it.
    import sys
    import types
    tools = types.ModuleType("xprof.cli.tools")
    tools.get_kernel_stats_tool = None
    for name, mod in (("xprof", types.ModuleType("xprof")),
                      ("xprof.cli", types.ModuleType("xprof.cli")), ("xprof.cli.tools", tools)):
      sys.modules.setdefault(name, mod)
  from tokamax._src.ops.attention import api as tokamax_api
  from tokamax._src.ops.attention import base as tokamax_base
  impl = tokamax_api.IMPLEMENTATIONS[backend]
  b, l, h, d = q.shape
  pos_np, counts = compacted_positions(select)
  pos = jnp.asarray(pos_np)
  valid = jnp.arange(pos.shape[1])[None, :] < jnp.asarray(counts)[:, None]
  k_end = jnp.where(valid, pos + 1, 1)[:, None, :]                     # [b, 1, cap]
  k_start = jnp.maximum(k_end - window, 0)
  mask = tokamax_base.Mask(k_start=k_start, k_end=k_end)
  take = lambda t: jnp.take_along_axis(t, pos[:, :, None, None], axis=1)
  qc, dc = take(q), take(dout)

  def attend(qc, k, v):
    return impl(qc, k, v, mask=mask)

  fwd = jax.jit(attend)
  fb = jax.jit(lambda qc, k, v, dc: jax.vjp(attend, qc, k, v)[1](dc))
  out_c = fwd(qc, k, v).astype(jnp.float32) * valid[:, :, None, None]
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], pos.shape)
  out = jnp.zeros((b, l, h, d), jnp.float32).at[rows, jnp.where(valid, pos, l)].set(
      out_c, mode="drop")
  return out, median_ms(lambda: fwd(qc, k, v), reps), median_ms(lambda: fb(qc, k, v, dc), reps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--fractions", default="0.05,0.15,0.3,1.0")
  parser.add_argument("--kinds", default="random,clustered")
  parser.add_argument("--shape", default="2,16384,12,64")
  parser.add_argument("--window", type=int, default=2048)
  parser.add_argument("--impls",
                      default="pallas,cudnn,xla,flex,tokamax_triton,tokamax_mosaic_gpu")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  device = jax.devices()[0]
  if device.platform != "gpu":
    raise SystemExit(f"benchmarks/selective_attention.py times GPU kernels; backend is "
                     f"{device.platform!r}")
  b, l, h, d = map(int, args.shape.split(","))
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, dout = (jax.random.normal(key, (b, l, h, d), jnp.bfloat16) for key in keys)
  results = {"device": device.device_kind, "jax": jax.__version__, "shape": [b, l, h, d],
             "window": args.window, "rows": []}
  name = device.device_kind.lower().replace(" ", "_")
  out_path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                      f"selective_attention_{name}.json")
  for kind in args.kinds.split(","):
    for fraction in map(float, args.fractions.split(",")):
      select = jnp.asarray(selection(kind, fraction, b, l))
      up = lambda t: t.astype(jnp.float32)
      ref = jax.jit(lambda q, k, v: ops.selective_window_attention(
          up(q), up(k), up(v), select, window=args.window, implementation="xla"))(q, k, v)
      scale = float(jnp.max(jnp.abs(ref)))
      rows = []
      for impl in args.impls.split(","):
        try:
          if impl == "flex":
            out, f_ms, fb_ms = bench_flex(q, k, v, dout, select, args.window, args.reps)
          elif impl.startswith("tokamax_"):
            out, f_ms, fb_ms = bench_tokamax(impl.removeprefix("tokamax_"), q, k, v, dout,
                                             select, args.window, args.reps)
          else:
            out, f_ms, fb_ms = bench_jax(impl, q, k, v, dout, select, args.window, args.reps)
        except Exception as e:  # noqa: BLE001 -- report the anchor as missing, go on
          print(f"{impl} failed at {kind} C={fraction}: {type(e).__name__}: {str(e)[:300]}")
          continue
        err = float(jnp.max(jnp.abs(up(out) - ref) * select[:, :, None, None])) / scale
        rows.append((impl, f_ms, fb_ms, err))
        print(f"  {kind} C={fraction} {impl}: {f_ms:.3f} / {fb_ms:.3f} ms, err {err:.1e}",
              flush=True)
      ours = dict((r[0], r) for r in rows).get("pallas")
      print(f"\n{kind} C={fraction}: {'impl':<8}{'fwd ms':>9}{'fwd+bwd ms':>12}"
            f"{'fwd/ours':>10}{'f+b/ours':>10}{'max err':>10}")
      for impl, f_ms, fb_ms, err in rows:
        rf = f_ms / ours[1] if ours else float("nan")
        rfb = fb_ms / ours[2] if ours else float("nan")
        print(f"{'':>16}{impl:<8}{f_ms:>9.3f}{fb_ms:>12.3f}{rf:>10.2f}{rfb:>10.2f}{err:>10.1e}")
        results["rows"].append({"selection": kind, "fraction": fraction, "implementation": impl,
                                "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "fwd_ratio_to_ours": rf,
                                "fwd_bwd_ratio_to_ours": rfb, "max_error": err})
      with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
  print(f"wrote {out_path}")


if __name__ == "__main__":
  main()
