r"""The floor of a batch-1 decode step: a chain of kernels that only stream bytes, one kernel
per dependent phase of the step, against the real step of the same model.

A decode token passes through the layers in order, and within a layer through phases that
each need all of the last one's output (a projection needs the whole normalised row; the SSM
update needs B and C; a split attention needs its combine). Each such phase is at least one
kernel launch, and no kernel can move its bytes faster than the memory allows. This
benchmark builds, for a config and a context length, the list of phases (bytes each must
read) and times a chain of Pallas Triton kernels that do nothing but read those bytes at
full speed, each waiting on the last one's output, in a jitted `lax.scan` like
benchmarks/decode.py. That time is the step's floor on this device for any design that
launches one kernel per phase; the real step (benchmarks/decode.py's timed call) is the
anchor, and the real step over the floor says how much is left to win. Below the floor lies
a bound no such design can beat: the same launches moving 2 KiB each, plus the step's bytes
at the best rate any streamed phase reached. For two models (the default: Taipan and
Transformer++) it prints the ratio of their floors at each context (both implemented to
the same standard), and the second's floor over the first's bound (the most a floor-speed
anchor can be over the first model's fastest possible step).

The phases are counted in Taipan's favour: a Mamba-2 block is two phases (in-projection with
its convolution; state update with the out-projection), as if its out-projection's
cross-program sum cost nothing (the built kernels take a third launch for it), and weights
are read once in bf16. A SAL and a Transformer++ block are the same six phases: norm + q, k,
v (and the gate); the attention's partial sums over the cache (the SAL's 2048-slot ring
buffer, the Transformer's whole context); their combine; the output projection; norm + the
SwiGLU up-projections; the down-projection. Then the LM head and the argmax over its logits.

    python benchmarks/decode_floor.py                       # GPU: 190M Taipan and Transformer++
    python benchmarks/decode_floor.py --configs=tiny --contexts=256 --anchor=0 --interpret
Writes benchmarks/results/decode_floor_<device>.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

import taipan_jax
from pallas_kernels.decode.window_attention import default_max_splits
from taipan_jax.config import layer_kinds, mlp_hidden_size, padded_vocab_size
from decode import decode_sweep
from report import result_path
from timing import median_ms

WIDTH = 1024            # a streamed buffer's row: 2 KiB of bf16 (any layout streams alike)
_F32 = jnp.float32


def decode_phases(cfg, context: int) -> list[tuple[str, int, int]]:
  """(name, weight bytes, other bytes) that each dependent phase of one decode token reads,
  in order (the module docstring says how they are counted). Weights in bf16 (the SAL's
  gate in fp32, as the model computes it); the other bytes are the caches (bf16 conv inputs
  and keys and values, the fp32 SSM state read and written back), partial results and the
  logits."""
  d, bf16, f32 = cfg.model.d_model, 2, 4
  m = cfg.mamba
  d_inner = m.expand * d
  heads = d_inner // m.head_dim
  conv_dim = d_inner + 2 * m.n_groups * m.d_state
  f = mlp_hidden_size(cfg)
  phases = []

  def attention_block(kind, slots, heads):
    splits = default_max_splits(slots)    # the decode attention kernel's chunk count
    phases.extend([
        (f"{kind} q k v", 3 * d * d * bf16 + (2 * d * f32 if kind == "sal" else 0), 0),
        (f"{kind} attention", 0, 2 * slots * d * bf16),
        (f"{kind} combine", 0, splits * heads * (d // heads + 2) * f32),
        (f"{kind} out-projection", d * d * bf16, 0),
        (f"{kind} swiglu up", 2 * d * f * bf16, 0),
        (f"{kind} down", f * d * bf16, 0)])

  for kind in layer_kinds(cfg):
    if kind == "m":
      phases.append(("mamba2 in-projection", (d_inner + conv_dim + heads) * d * bf16,
                     (m.d_conv - 1) * conv_dim * bf16))
      phases.append(("mamba2 state + out-projection", d_inner * d * bf16,
                     2 * heads * m.head_dim * m.d_state * f32))
    elif kind == "s":
      attention_block("sal", cfg.sal.window, d // cfg.sal.head_dim)
    elif kind == "a":
      attention_block("attention", context, d // cfg.attention.head_dim)
    else:
      raise ValueError(f"layer kind {kind!r} has no decode phases here")
  vocab = padded_vocab_size(cfg)
  phases.append(("lm head", vocab * d * bf16, 0))
  phases.append(("argmax", 0, vocab * f32))
  return phases


def _stream_kernel(prev_ref, buf_ref, o_ref, *, block_rows, rows):
  """One program: its [block_rows, WIDTH] tile of buf, summed, plus the last phase's output
  (so that this launch needs the last one's result, as a real phase does)."""
  pid = pl.program_id(0)
  row0 = pid * block_rows
  ok = row0 + jnp.arange(block_rows) < rows
  tile = plgpu.load(buf_ref.at[pl.ds(row0, block_rows), :], mask=ok[:, None], other=0.0)
  dep = plgpu.load(prev_ref.at[pl.ds(0, 1)])
  plgpu.store(o_ref.at[pl.ds(pid, 1)], jnp.sum(tile.astype(_F32)) + dep)


@functools.partial(jax.jit, static_argnames=("block_rows", "num_warps", "interpret"))
def stream(prev, buf, *, block_rows: int = 16, num_warps: int = 4, interpret: bool = False):
  """prev: [>= 1] f32 (the last phase's output); buf: [rows, WIDTH] bf16.
  Returns [programs] f32: each program's tile sum plus prev[0]."""
  rows = buf.shape[0]
  programs = pl.cdiv(rows, block_rows)
  kernel = functools.partial(_stream_kernel, block_rows=block_rows, rows=rows)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((programs,), _F32), grid=(programs,),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="stream_phase")(prev, buf)


def phase_buffers(sizes, key) -> list[jax.Array]:
  """One buffer of each size in bytes (a phase's own, as each layer has its own weights), at
  least one row; small random values so that the sums stay finite."""
  bufs = []
  for i, nbytes in enumerate(sizes):
    rows = max(1, -(-nbytes // (2 * WIDTH)))
    bufs.append((0.01 * jax.random.normal(jax.random.fold_in(key, i), (rows, WIDTH),
                                          _F32)).astype(jnp.bfloat16))
  return bufs


# (rows a program, warps): the streaming kernel's shapes tried for each phase size.
VARIANTS = ((1, 2), (2, 2), (2, 4), (4, 4), (8, 4), (16, 4), (32, 8))


def check_stream(interpret: bool) -> None:
  """Each variant of the streaming kernel against numpy, on an awkward row count."""
  buf = phase_buffers([77 * 2 * WIDTH], jax.random.key(1))[0]
  rows = np.asarray(buf, np.float64).sum(1)
  for block_rows, num_warps in VARIANTS:
    out = stream(jnp.full((3,), 0.5, _F32), buf, block_rows=block_rows, num_warps=num_warps,
                 interpret=interpret)
    want = np.add.reduceat(rows, np.arange(0, len(rows), block_rows)) + 0.5
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-3, atol=1e-3)


def chain_ms(bufs, choices, *, steps, reps, interpret) -> float:
  """Milliseconds per token of a chain of streaming kernels (buffer i streamed with
  choices[i] = (rows a program, warps)), each waiting on the last, `steps` tokens a call."""

  @jax.jit
  def chain(bufs, x):
    def token(x, _):
      for buf, (block_rows, num_warps) in zip(bufs, choices):
        x = stream(x, buf, block_rows=block_rows, num_warps=num_warps, interpret=interpret)
      return x[:1], None
    return jax.lax.scan(token, x, None, length=steps)[0]

  return median_ms(lambda: chain(bufs, jnp.zeros((1,), _F32)), reps=reps, loops=1) / steps


def fastest_variant(nbytes, *, steps, reps, interpret) -> tuple[tuple[int, int], dict]:
  """The streaming kernel's fastest shape for a phase of `nbytes`, timed as a dependent
  chain of copies of the phase, each with its own buffer (so that, as in the step, a
  phase's bytes are not in L2 from the last one), and µs per phase for each shape. As many
  tokens a call as the step's chain: a call's fixed cost (tens of µs) must not decide."""
  copies = int(np.clip((256 << 20) // max(nbytes, 1), 2, 8))
  bufs = phase_buffers([nbytes] * copies, jax.random.key(2))
  us = {f"{r}x{w}": 1e3 * chain_ms(bufs, [(r, w)] * copies, steps=steps, reps=reps,
                                   interpret=interpret) / copies
        for r, w in VARIANTS}
  best = min(us, key=us.get)
  return tuple(int(v) for v in best.split("x")), us


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="taipan_190m,transformer_190m")
  parser.add_argument("--contexts", default="1024,16384,65536,131072,262144,1048576")
  parser.add_argument("--steps", type=int, default=64, help="decode tokens per timed call")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--anchor", type=int, default=1,
                      help="1: also time the real decode step (benchmarks/decode.py's call)")
  parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  device = jax.devices()[0]
  record = {"benchmark": "decode_floor", "device": device.device_kind, "jax": jax.__version__,
            "steps_per_call": args.steps, "rows": [], "anchor_rows": []}
  path = result_path(args.out, "decode_floor", suffix="")
  contexts = [int(c) for c in args.contexts.split(",")]
  names = args.configs.split(",")
  configs = {n: taipan_jax.load_config(n, {"model.dtype": "bfloat16"}) for n in names}
  # A model without full attention has the same step at every context: timed at the first.
  model_contexts = {n: contexts if "a" in layer_kinds(cfg) else contexts[:1]
                    for n, cfg in configs.items()}
  check_stream(args.interpret)
  tuned = {}                # phase bytes -> (fastest shape, µs per phase of each shape)
  for name, cfg in configs.items():
    for context in model_contexts[name]:
      phases = [(p, w + o) for p, w, o in decode_phases(cfg, context)]
      for _, nbytes in phases:
        if nbytes not in tuned:
          tuned[nbytes] = fastest_variant(nbytes, steps=args.steps, reps=args.reps,
                                          interpret=args.interpret)
      bufs = phase_buffers([b for _, b in phases], jax.random.key(0))
      choices = [tuned[nbytes][0] for _, nbytes in phases]
      floor = chain_ms(bufs, choices, steps=args.steps, reps=args.reps,
                       interpret=args.interpret)
      # The same chain moving 2 KiB a phase: what the launches alone cost.
      tiny = phase_buffers([1] * len(phases), jax.random.key(0))
      launches = chain_ms(tiny, [VARIANTS[0]] * len(phases), steps=args.steps, reps=args.reps,
                          interpret=args.interpret)
      del bufs
      nbytes = sum(b for _, b in phases)
      row = {"model": name, "context": context, "phases": len(phases), "bytes": nbytes,
             "floor_ms": floor, "launch_floor_ms": launches,
             "floor_gb_per_s": nbytes / floor / 1e6,
             "phase_us": [{"phase": p, "bytes": b, "shape": "%dx%d" % tuned[b][0],
                           "us": min(tuned[b][1].values())} for p, b in phases]}
      record["rows"].append(row)
      print(f"{name:>18} context {context:>8}: {len(phases)} phases, {nbytes / 2**20:8.1f} MiB,"
            f" floor {floor:.4f} ms ({row['floor_gb_per_s']:.0f} GB/s), launches alone "
            f"{launches:.4f} ms ({1e3 * launches / len(phases):.2f} us each)", flush=True)
  record["phase_shapes_us"] = {str(b): us for b, (_, us) in sorted(tuned.items())}
  for b, (shape, us) in sorted(tuned.items()):
    print(f"  phase of {b / 2**20:9.3f} MiB: fastest {shape[0]}x{shape[1]}, "
          + ", ".join(f"{k} {v:.2f}" for k, v in us.items()) + " us")
  # The bound: each phase's launch, then its bytes at the best rate any phase streamed at,
  # with nothing overlapped across a launch (without programmatic dependent launch, which
  # Pallas kernels do not get, a kernel starts only after the last one ends).
  peak = max(b / min(us.values()) / 1e3 for b, (_, us) in tuned.items())     # GB/s
  record["peak_stream_gb_per_s"] = peak
  for row in record["rows"]:
    row["bound_ms"] = row["launch_floor_ms"] + row["bytes"] / peak / 1e6
  print(f"  fastest stream: {peak:.0f} GB/s; bounds (launches + bytes at that rate): "
        + ", ".join(f"{r['model']}@{r['context']} {r['bound_ms']:.4f} ms"
                    for r in record["rows"]))
  if args.anchor:
    anchor_args = types.SimpleNamespace(steps=args.steps, reps=args.reps)
    anchor = {"rows": []}
    for name in names:
      decode_sweep(name, model_contexts[name], anchor_args, anchor, path + "_anchor")
    record["anchor_rows"] = anchor["rows"]
    os.remove(path + "_anchor.json")      # decode_sweep's running copy; the record has it
  floor = {(r["model"], r["context"]): r["floor_ms"] for r in record["rows"]}
  bound = {(r["model"], r["context"]): r["bound_ms"] for r in record["rows"]}
  real = {(r["model"], r["context"]): r.get("ms_per_token") for r in record["anchor_rows"]}
  at = lambda table, n, c: table.get((n, c if c in model_contexts[n] else contexts[0]))
  print(f"\n{'context':>9}" + "".join(f"{n + ' floor':>24}{'real':>9}{'real/floor':>11}"
                                     for n in names))
  for c in contexts:
    line = f"{c:>9}"
    for n in names:
      fl, re = at(floor, n, c), at(real, n, c)
      line += f"{fl:>21.4f} ms" + (f"{re:>9.4f}{re / fl:>11.2f}" if re else f"{'-':>9}{'-':>11}")
    print(line)
  if len(names) == 2:
    base, other = names
    print(f"\n{other} / {base}:")
    for c in contexts:
      fl = at(floor, other, c) / at(floor, base, c)
      re_b, re_o = at(real, base, c), at(real, other, c)
      record.setdefault("floor_ratio", {})[c] = fl
      ub = at(floor, other, c) / at(bound, base, c)
      record.setdefault("floor_over_bound", {})[c] = ub
      line = f"{c:>9}: floors {fl:.2f}, {other}'s floor over {base}'s bound {ub:.2f}"
      if re_b and re_o:
        record.setdefault("real_ratio", {})[c] = re_o / re_b
        line += (f", real steps {re_o / re_b:.2f}, real {other} over {base}'s floor "
                 f"{re_o / at(floor, base, c):.2f}")
      print(line)
  with open(path + ".json", "w") as f:
    json.dump(record, f, indent=1)
  print(f"wrote {path}.json")


if __name__ == "__main__":
  main()
