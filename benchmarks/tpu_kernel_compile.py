r"""Compile every Pallas TPU kernel, forward and backward, with Mosaic for TPU generations
that this machine does not have (libtpu describes the slice; nothing runs).

    python benchmarks/tpu_kernel_compile.py [--generations=v5e,v5p,v6e] [--shapes=all]

Each program is the value and gradient of a loss through one kernel, inside shard_map over a 4-chip
topology (one batch row per chip), as the trainer runs it. Prints the matrix kernel x
generation x shape (compiled or the first line of the error, compile seconds, Mosaic calls)
and writes benchmarks/results/tpu_kernel_compile.json. Shapes: the 190M / 450M / 1.3B
layers at 4096 tokens in bf16 with packed-document segment ids, and an awkward one (1000
tokens, fp32, SSD groups 2, attention with kv_select and a window of 300).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.selective_attention import BlockSizes as AttnBlocks
from pallas_kernels.selective_attention import selective_attention_tpu
from pallas_kernels.ssd import BlockSizes as SsdBlocks
from pallas_kernels.ssd import ssd_tpu
from taipan_jax.sharding.topology import topology_devices

GENERATION_TOPOLOGY = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


@dataclasses.dataclass(frozen=True)
class Shape:
  """One kernel-call shape per device (batch 1 per chip). SSD: heads x head_dim, groups x
  d_state, chunk; attention: heads x head_dim, window."""
  seq: int
  ssd_heads: int
  groups: int
  d_state: int
  chunk: int
  attn_heads: int
  window: int
  dtype: str = "bfloat16"
  kv_select: bool = False
  head_dim: int = 64


SHAPES = {
    "190m": Shape(4096, 24, 1, 128, 256, 12, 2048),
    "450m": Shape(4096, 32, 1, 128, 256, 16, 2048),
    "1.3b": Shape(4096, 64, 1, 128, 256, 32, 2048),
    "odd": Shape(1000, 8, 2, 64, 128, 3, 300, dtype="float32", kv_select=True),
    "small": Shape(1024, 4, 1, 128, 128, 2, 256),       # the CI test's second shape
}


def _mesh(topology: str):
  return jax.sharding.Mesh(np.array(topology_devices(topology)), ("data",))


def _ssd_program(s: Shape):
  def kernel(x, dt, A, B, C, seg):
    y, final = ssd_tpu(x, dt, A, B, C, None, seg, block_sizes=SsdBlocks(chunk=s.chunk))
    return y, final

  def args(row):
    dt = jnp.dtype(s.dtype)
    return ((row((s.seq, s.ssd_heads, s.head_dim), dt), row((s.seq, s.ssd_heads), jnp.float32),
             jax.ShapeDtypeStruct((s.ssd_heads,), jnp.float32),
             row((s.seq, s.groups, s.d_state), dt), row((s.seq, s.groups, s.d_state), dt),
             row((s.seq,), jnp.int32)),
            (P("data"), P("data"), P(), P("data"), P("data"), P("data")), 5)
  return kernel, args


def _attention_program(s: Shape):
  def kernel(q, k, v, select, seg, kv):
    return selective_attention_tpu(q, k, v, select, window=s.window, segment_ids=seg,
                                   kv_select=kv if s.kv_select else None,
                                   block_sizes=AttnBlocks.uniform(128, 128))

  def args(row):
    dt = jnp.dtype(s.dtype)
    qkv = row((s.seq, s.attn_heads, s.head_dim), dt)
    return ((qkv, qkv, qkv, row((s.seq,), jnp.bool_), row((s.seq,), jnp.int32),
             row((s.seq,), jnp.bool_)), (P("data"),) * 6, 3)
  return kernel, args


PROGRAMS = {"ssd": _ssd_program, "selective_attention": _attention_program}


def compile_kernel(kernel_name: str, topology: str, shape: Shape):
  """Compiles value_and_grad(sum of outputs) through the kernel, under shard_map over the topology's
  chips. Returns (seconds, number of Mosaic calls in the compiled program)."""
  mesh = _mesh(topology)
  chips = mesh.size
  kernel, make_args = PROGRAMS[kernel_name](shape)
  row = lambda tail, dt: jax.ShapeDtypeStruct((chips,) + tail, dt,
                                              sharding=NamedSharding(mesh, P("data")))
  args, specs, num_diff = make_args(row)
  args = tuple(a if a.sharding is not None else
               jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
               for a in args)

  def loss(*args):
    outs = jax.shard_map(lambda *a: jax.tree.leaves(kernel(*a)), in_specs=specs,
                         out_specs=P("data"), check_vma=False)(*args)
    return sum(jnp.sum(o.astype(jnp.float32)) for o in outs)

  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(num_diff)))).lower(
        *args).compile()
    seconds = time.perf_counter() - start
  return seconds, compiled.as_text().count('custom_call_target="tpu_custom_call"')


def _libtpu_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "not installed"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--generations", default="v5e,v5p,v6e")
  parser.add_argument("--shapes", default="190m,450m,1.3b,odd")
  parser.add_argument("--kernels", default=",".join(PROGRAMS))
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  rows = []
  print(f"{'kernel':20s} {'gen':4s} {'shape':6s} {'result':8s} {'seconds':>8s} mosaic")
  for kernel in args.kernels.split(","):
    for gen in args.generations.split(","):
      for name in args.shapes.split(","):
        row = {"kernel": kernel, "generation": gen, "topology": GENERATION_TOPOLOGY[gen],
               "shape": name, **dataclasses.asdict(SHAPES[name])}
        try:
          seconds, mosaic = compile_kernel(kernel, GENERATION_TOPOLOGY[gen], SHAPES[name])
          row.update(compiled=True, compile_seconds=round(seconds, 2), mosaic_kernels=mosaic)
        except Exception as e:  # the matrix records a failure and goes on
          row.update(compiled=False, error=str(e).strip().splitlines()[0][:300])
        rows.append(row)
        print(f"{kernel:20s} {gen:4s} {name:6s} "
              f"{'ok' if row['compiled'] else 'FAILED':8s} "
              f"{row.get('compile_seconds', float('nan')):8.2f} {row.get('mosaic_kernels', '')}"
              + ("" if row["compiled"] else f"  {row['error']}"), flush=True)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "tpu_kernel_compile.json")
  with open(path, "w") as f:
    json.dump({"jax": jax.__version__, "libtpu": _libtpu_version(), "host_backend": jax.default_backend(),
               "note": "compiled for TPU topologies described by libtpu; nothing executed",
               "rows": rows}, f, indent=1)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
