"""Compile the real training step for a TPU slice on any machine, and say whether it fits.

`taipan compile --config=... --topology=v5e:4x4` runs this. libtpu describes the slice
(sharding.topology); the step is the one `taipan train` jits (training.step), laid out by the
same mesh and rules (training.partition), with the kernels the config asks for (dispatch
follows the mesh's TPU devices: ops.platform). XLA:TPU and Mosaic compile it; nothing runs.

What the executable reports, per device: memory (arguments, outputs, temporaries), FLOPs and
bytes accessed. XLA's cost analysis does not see inside a Mosaic kernel, so the FLOPs of the
SSD and attention kernels are added from the analytic count (training.flops; the selective
attention counted dense, an upper bound on what the kernel computes).
"""
from __future__ import annotations

import math
import re
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from taipan_jax.models.build import build_model
from taipan_jax.ops.attention import attention_route
from taipan_jax.ops.ssd import ssd_route
from taipan_jax.sharding.topology import CHIPS, TopologyError, parse_topology, topology_devices
from taipan_jax.training import flops, partition
from taipan_jax.training.step import make_steps

STEPS = ("train", "eval", "long_context")
_GIB = float(1 << 30)
_HBM_REFUSAL = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all")


class AotCompileError(ValueError):
  """The slice, the step or the mesh cannot be compiled (the message names the fix)."""


def _batch(b: int, l: int) -> dict:
  return {k: jax.ShapeDtypeStruct((b, l), dt) for k, dt in
          (("tokens", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
           ("segment_ids", np.int32))}


def _build(cfg):
  return lambda: build_model(cfg, rngs=nnx.Rngs(params=cfg.train.seed,
                                                           gumbel=cfg.train.seed + 1))


def _itemsize(dtype) -> int:
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return 8                        # a threefry key: two uint32 words
  return np.dtype(dtype).itemsize


def _per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of abstract arrays laid out by `shardings` (a matching tree)."""
  one = lambda x, s: math.prod(s.shard_shape(x.shape)) * _itemsize(x.dtype)
  return int(sum(jax.tree.leaves(jax.tree.map(one, tree, shardings))))


def _lower_step(cfg, devices, step: str):
  """(lowered, mesh, tokens per step, argument bytes per device) of the train or eval step
  under the config's mesh."""
  steps = make_steps(cfg, _build(cfg))
  try:
    plan = partition.make_plan(cfg, steps.abstract_state, devices)
  except partition.PartitionError as e:
    raise AotCompileError(str(e)) from None
  b, l = cfg.train.batch_size, cfg.data.seq_len
  batch = _batch(b, l)
  state, state_sh = ((steps.abstract_state, plan.state) if step == "train"
                     else (steps.abstract_state.params, plan.state.params))
  arguments = (_per_device_bytes(state, state_sh)
               + _per_device_bytes(batch, {k: plan.batch for k in batch}))
  params = _per_device_bytes(steps.abstract_state.params, plan.state.params)
  lower = partition.lower_train_step if step == "train" else partition.lower_eval_step
  return lower(steps, plan, batch), plan.mesh, b * l, arguments, params


def _lower_long_context(cfg, devices, segment_len: int):
  """One segment of `taipan eval --long_context` (inference.long_context), its length split
  over every device of the slice (a 'sequence' mesh), the cache carried in and out."""
  from taipan_jax.inference import long_context
  from taipan_jax.sharding.context_parallel import split_refusal
  model = nnx.eval_shape(_build(cfg))
  model.eval()
  refusal = split_refusal(model)
  if refusal is not None:
    raise AotCompileError(f"--step=long_context splits a segment over the slice: {refusal}")
  ways = len(devices)
  if segment_len % ways or segment_len // ways < cfg.sal.window:
    raise AotCompileError(f"--segment_len={segment_len}: must split evenly over {ways} "
                          f"devices with at least sal.window={cfg.sal.window} tokens each; "
                          f"fix: a multiple of {ways} >= {ways * cfg.sal.window}")
  mesh = jax.sharding.Mesh(np.asarray(devices), ("sequence",))
  graphdef, state = nnx.split(model)
  cache = jax.eval_shape(lambda: model.init_cache(1))
  whole = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(None, "sequence"))
  place = lambda tree, sh: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)
  tokens = jax.ShapeDtypeStruct((1, segment_len), np.int32, sharding=split)
  fn = long_context._segment_fn(graphdef, mesh)
  with jax.set_mesh(mesh):
    lowered = fn.lower(place(state, whole), tokens, tokens, place(cache, whole))
  arguments = (_per_device_bytes(state, jax.tree.map(lambda _: whole, state))
               + _per_device_bytes(cache, jax.tree.map(lambda _: whole, cache))
               + 2 * _per_device_bytes(tokens, split))
  return lowered, mesh, segment_len, arguments


def _kernel_flops(cfg, mesh, step: str, tokens: int, seq_len: int) -> float:
  """Per-device FLOPs inside the Mosaic kernels the step uses (analytic; cost_analysis misses
  them): the SSD and the SAL's attention, x3 for a training step."""
  parts = flops.forward_flops_breakdown(cfg, seq_len)
  with jax.set_mesh(mesh):
    ssd = ssd_route(cfg.mamba.kernel, head_dim=cfg.mamba.head_dim, d_state=cfg.mamba.d_state,
                    chunk_size=cfg.mamba.chunk_size).platform == "tpu"
    attention = attention_route(
        cfg.sal.kernel, head_dim=cfg.sal.head_dim, dtype=cfg.model.dtype,
        seq_len=seq_len // mesh.shape.get("sequence", 1)).platform == "tpu"
  per_token = parts["ssd"] * ssd + parts["sal_attention"] * attention
  return per_token * tokens * (3.0 if step == "train" else 1.0) / mesh.size


def _count_collectives(hlo: str) -> dict[str, int]:
  counts = {}
  for name in _COLLECTIVES:
    n = len(re.findall(rf"\s{name}(?:-start)?\(", hlo))
    if n:
      counts[name] = n
  return counts


def compile_for_topology(cfg, topology: str, *, chip_config: str = "default",
                         num_slices: int = 1, step: str = "train",
                         segment_len: int | None = None) -> dict:
  """Compiles `step` of a validated config for a TPU slice; returns the report (a JSON-ready
  dict: memory per device against the chip's HBM, FLOPs, bytes, kernel and collective
  counts, compile seconds, a predicted step time)."""
  if step not in STEPS:
    raise AotCompileError(f"--step={step!r} is unknown; use one of {STEPS}")
  try:
    chip, _ = parse_topology(topology)
    devices = topology_devices(topology, chip_config=chip_config, num_slices=num_slices)
  except TopologyError as e:
    raise AotCompileError(str(e)) from None
  start = time.perf_counter()
  if step == "long_context":
    lowered, mesh, tokens, arguments = _lower_long_context(cfg, devices,
                                                           segment_len or cfg.data.seq_len)
    seq_len, params, accum = tokens, 0, 1
  else:
    lowered, mesh, tokens, arguments, params = _lower_step(cfg, devices, step)
    seq_len = cfg.data.seq_len
    accum = cfg.train.grad_accum_steps if step == "train" else 1
  head = {"topology": topology, "chip_config": chip_config, "num_slices": num_slices,
          "step": step, "num_devices": mesh.size, "mesh": dict(mesh.shape),
          "tokens_per_step": tokens, "device_kind": chip.device_kind}
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    over = _HBM_REFUSAL.search(str(e))
    if over is None:
      raise
    # XLA:TPU refuses a program whose temporaries exceed the HBM: no executable, so no cost
    # analysis; the arguments are counted from their shardings.
    temporaries = int(float(over.group(1)) * _GIB)
    return {**head, "fits": False, "compiler_refused": str(e).strip().splitlines()[0],
            "memory_per_device_bytes": arguments + temporaries,
            "memory_breakdown_bytes": {"arguments": arguments, "temporaries": temporaries},
            "hbm_bytes": chip.hbm_bytes, "mosaic_kernels": None, "collectives": None,
            "flops": None, "bytes_accessed": None,
            "compile_seconds": round(time.perf_counter() - start, 1), "prediction": None,
            "jax": jax.__version__}
  seconds = time.perf_counter() - start

  mem = compiled.memory_analysis()
  memory = {"arguments": int(mem.argument_size_in_bytes),
            "outputs": int(mem.output_size_in_bytes),
            "aliased": int(mem.alias_size_in_bytes),    # outputs written over donated inputs
            "temporaries": int(mem.temp_size_in_bytes),
            "generated_code": int(mem.generated_code_size_in_bytes)}
  total = (memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
           + memory["generated_code"])
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", 0.0))
  bytes_accessed = float(cost.get("bytes accessed", 0.0))
  if accum > 1:
    # XLA's cost analysis counts a loop body once: the micro-batch scan runs `accum` times.
    # Outside it is the optimizer update, whose bytes are taken as 7 passes over the
    # parameters (read params, gradients and two moments; write params and moments); its
    # FLOPs are a few per parameter and are scaled with the rest.
    update = 7 * params
    xla_flops *= accum
    bytes_accessed = accum * max(bytes_accessed - update, 0.0) + update
  kernel_flops = _kernel_flops(cfg, mesh, step, tokens, seq_len)
  hlo = compiled.as_text()
  peak = flops.peak_flops_per_second(chip.device_kind, cfg.model.dtype)
  compute_s = (xla_flops + kernel_flops) / peak
  memory_s = bytes_accessed / chip.hbm_bytes_per_s
  step_s = max(compute_s, memory_s)
  return {
      **head, "fits": total <= chip.hbm_bytes, "memory_per_device_bytes": total,
      "memory_breakdown_bytes": memory, "hbm_bytes": chip.hbm_bytes,
      "mosaic_kernels": hlo.count('custom_call_target="tpu_custom_call"'),
      "collectives": _count_collectives(hlo),
      "flops": xla_flops + kernel_flops, "flops_xla": xla_flops,
      "flops_in_kernels_analytic": kernel_flops, "bytes_accessed": bytes_accessed,
      "grad_accum_steps": accum,
      "compile_seconds": round(seconds, 1),
      "prediction": {
          "note": "a prediction from the compiled cost, not a measurement: max(FLOPs / peak, "
                  "bytes accessed / HBM bandwidth) per device",
          "peak_flops_per_s": peak, "hbm_bytes_per_s": chip.hbm_bytes_per_s,
          "compute_seconds": compute_s, "memory_seconds": memory_s,
          "bound": "compute" if compute_s >= memory_s else "memory",
          "step_seconds": step_s,
          "tokens_per_s_per_chip": tokens / step_s / mesh.size if step_s > 0 else None},
      "jax": jax.__version__,
  }


def format_report(r: dict) -> str:
  gib = lambda v: f"{v / _GIB:.2f} GiB" if v >= _GIB / 10 else f"{v / 2**20:.1f} MiB"
  m, pred = r["memory_breakdown_bytes"], r["prediction"]
  if pred is None:        # the compiler refused it: over the HBM
    return "\n".join([
        f"{r['step']} step for {r['topology']} ({r['num_devices']} x {r['device_kind']}), "
        "mesh " + " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1),
        f"  memory per device: arguments {gib(m['arguments'])}, temporaries "
        f"{gib(m['temporaries'])} (XLA:TPU refused to compile it: {r['compiler_refused']})",
        f"  total {gib(r['memory_per_device_bytes'])} of {gib(r['hbm_bytes'])} HBM: "
        "DOES NOT FIT"])
  lines = [
      f"{r['step']} step for {r['topology']} ({r['num_devices']} x {r['device_kind']}, "
      f"chip_config={r['chip_config']}, slices={r['num_slices']}), mesh "
      + " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) + f", compiled in "
      f"{r['compile_seconds']:.1f} s",
      f"  memory per device: arguments {gib(m['arguments'])}, outputs {gib(m['outputs'])} "
      f"(aliased {gib(m['aliased'])}), temporaries {gib(m['temporaries'])}, code "
      f"{gib(m['generated_code'])}",
      f"  total {gib(r['memory_per_device_bytes'])} of {gib(r['hbm_bytes'])} HBM: "
      + ("fits" if r["fits"] else "DOES NOT FIT"),
      f"  FLOPs per device {r['flops']:.3e} (XLA {r['flops_xla']:.3e} + Mosaic kernels "
      f"{r['flops_in_kernels_analytic']:.3e} analytic), bytes accessed "
      f"{r['bytes_accessed']:.3e}",
      f"  Mosaic kernels {r['mosaic_kernels']}; collectives "
      + (", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "none"),
      f"  predicted step {pred['step_seconds'] * 1e3:.1f} ms ({pred['bound']}-bound), "
      f"{pred['tokens_per_s_per_chip']:,.0f} tokens/s per chip (a prediction from compiled "
      "cost, not a measurement)",
  ]
  return "\n".join(lines)


def does_not_fit(r: dict) -> str:
  """The one line for a step over the chip's HBM: how far over, and the levers."""
  over = r["memory_per_device_bytes"] - r["hbm_bytes"]
  return (f"the {r['step']} step needs {r['memory_per_device_bytes'] / _GIB:.2f} GiB per "
          f"device on {r['topology']}, {over / _GIB:.2f} GiB over the chip's "
          f"{r['hbm_bytes'] / _GIB:.2f} GiB HBM; levers: shard parameters and optimizer "
          "state (--config.mesh.fsdp=N), fewer rows per step (--config.train.batch_size), "
          "gradient accumulation (--config.train.grad_accum_steps=N), the Pallas kernels "
          "(--config.mamba.kernel=pallas --config.sal.kernel=pallas), or more chips; "
          "rematerialisation is not a config option yet")


__all__ = ["AotCompileError", "CHIPS", "STEPS", "compile_for_topology", "does_not_fit",
           "format_report"]
