r"""Registers and spills of the GPU SSD kernels, without a GPU: each kernel lowered for CUDA
and compiled by Triton for sm_90 (Hopper), with ptxas's resource counts.

For every setting, the forward and the backward are lowered for CUDA on whatever host this
runs on; each pallas_call's Triton IR is taken from the lowering and compiled with the
`triton` package at that kernel's num_warps and num_stages; cuobjdump (shipped with Triton)
reads registers per thread and the stack frame, where spilled registers go. Registers past
255 spill, and spills in an inner loop are what the chunk-gradient kernel's timing suffers
from (docs/kernels/ssd.md).

Needs `triton` (on a GPU image it is there; elsewhere `pip install triton`). The Triton here
is the pip package, not the one XLA bundles, so the counts are a close proxy, not the GPU's
own; compare settings within one run. Uses jax internals (the Pallas Triton lowering hook).

    python benchmarks/ssd_registers.py
    python benchmarks/ssd_registers.py --settings=defaults,sub128_32 --kernels=ssd_chunk_grad
Writes benchmarks/results/ssd_registers.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import pallas_call_registration

from pallas_kernels.ssd import BlockSizes, gpu

SETTINGS = {
    "defaults": BlockSizes.for_backend("gpu"),
    "defaults_w8": dataclasses.replace(BlockSizes.for_backend("gpu"), num_warps_bwd=8),
    "sub128_32": dataclasses.replace(BlockSizes.for_backend("gpu"), chunk_bwd=128,
                                     chunk_grad=32),
    "sub128_32_w8": dataclasses.replace(BlockSizes.for_backend("gpu"), chunk_bwd=128,
                                        chunk_grad=32, num_warps_bwd=8),
    "sub64_32": dataclasses.replace(BlockSizes.for_backend("gpu"), chunk_bwd=64, chunk_grad=32),
    "two_level128": dataclasses.replace(BlockSizes.for_backend("gpu"), chunk=128,
                                        chunk_bwd=128, chunk_grad=32, two_level=True),
}


def triton_modules(fn, args):
  """{pallas_call name: Triton IR text} of fn(*args) lowered for CUDA."""
  lowering = pallas_call_registration.lowering
  original = lowering.lower_jaxpr_to_triton_module
  modules = {}

  def capture(*a, **k):
    result = original(*a, **k)
    text = result.module.operation.get_asm(enable_debug_info=False)
    modules[re.search(r"tt.func public @(\w+)", text).group(1)] = text
    return result

  lowering.lower_jaxpr_to_triton_module = capture
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  return modules


def resources(ttir: str, num_warps: int, num_stages: int) -> dict:
  import triton
  from triton.backends.compiler import GPUTarget
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = os.path.join(tmp, "kernel.cubin")
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", cubin], capture_output=True, text=True,
                           check=True).stdout
  m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
  ptx = kernel.asm["ptx"]
  return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2)),
          "shared_bytes": kernel.metadata.shared,
          "mma": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="8,4096,24,64,1,128")
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--kernels", default="", help="pallas_call names (default: all)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "ssd_registers.json"))
  args = parser.parse_args()
  import triton
  b, l, h, p, g, n = (int(v) for v in args.shape.split(","))
  bf, f32 = jnp.bfloat16, jnp.float32
  S = jax.ShapeDtypeStruct
  x, dt, A = S((b, l, h, p), bf), S((b, l, h), f32), S((h,), f32)
  B = S((b, l, g, n), bf)
  init, seg = S((b, h, p, n), f32), S((b, l), jnp.int32)
  wanted = set(filter(None, args.kernels.split(",")))
  rows = []
  print(f"{'setting':<14}{'kernel':<22}{'warps':>6}{'stages':>7}{'regs':>6}{'stack B':>9}"
        f"{'shared B':>10}  mma")
  for name in args.settings.split(","):
    bs = SETTINGS[name]
    passes = {
        (bs.num_warps, bs.num_stages): triton_modules(
            lambda *a: gpu.ssd_forward_gpu(*a, block_sizes=bs), (x, dt, A, B, B, init, seg)),
        (bs.num_warps_bwd or bs.num_warps, bs.num_stages_bwd): triton_modules(
            lambda *a: gpu.ssd_backward_gpu(*a, block_sizes=bs),
            (x, dt, A, B, B, init, seg, x, init)),
    }
    for (warps, stages), modules in passes.items():
      for kernel, ttir in modules.items():
        if wanted and kernel not in wanted:
          continue
        r = {"setting": name, "kernel": kernel, "num_warps": warps, "num_stages": stages,
             **resources(ttir, warps, stages)}
        rows.append(r)
        print(f"{name:<14}{kernel:<22}{warps:>6}{stages:>7}{r['registers']:>6}"
              f"{r['stack_bytes']:>9}{r['shared_bytes']:>10}  {r['mma']}", flush=True)
  with open(args.out, "w") as f:
    json.dump({"jax": jax.__version__, "triton": triton.__version__, "target": "sm_90",
               "shape": [b, l, h, p, g, n],
               "settings": {k: dataclasses.asdict(SETTINGS[k]) for k in args.settings.split(",")},
               "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
