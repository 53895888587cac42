r"""Size the Taipan models on TPU slices a user would rent, from compiled executables.

    nice -n 15 python benchmarks/tpu_sizing.py [--max_compiles=N] [--only=190m]

For 190M, 450M and 1.3B at context 4096 and the paper's 0.5M-token global batch (128 rows),
bf16 compute, with the Pallas kernels and without: the mesh (rule below), per-device memory
from the compiled executable (`taipan compile`'s report), whether it fits the chip's HBM,
and a predicted step time, max(FLOPs / peak, bytes / HBM bandwidth) per device, stated as a
prediction. Also one 1M-token long-context evaluation on a v5e-8 (a segment of 131,072
tokens split over the 8 chips with the sequence mesh; 8 segments make the million).

Compiling is slow (minutes per 190M step on 2 CPU cores), so rows run in priority order,
each result is written to benchmarks/results/tpu_sizing.json as it comes, and a rerun skips
rows already there. Rows not compiled are extrapolated from the compiled row of the same
model, kernels and generation at the same per-device program (one row of 4096 tokens per
micro-step, the same fsdp): per-device memory carries over, the step time scales with the
micro-steps; the table says which is which.

Mesh rule: fsdp is the smallest power of two that brings the 16 bytes per parameter of the
training state under a quarter of a chip's HBM; data takes the other chips; each chip runs
one row of 4096 tokens per micro-step and the step accumulates 128 / data·fsdp of them. A
slice with more chips than rows (v5e-256) also splits each row over 2 chips (sequence=2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax

from taipan_jax.config import load_config
from taipan_jax.sharding.topology import CHIPS
from taipan_jax.training import aot_compile

MODELS = {"190m": ("taipan_190m", 187e6), "450m": ("taipan_450m", 446e6),
          "1.3b": ("taipan_1_3b", 1.29e9)}
# gcloud names: v5e-N and v6e-N count chips, v5p-N counts TensorCores (2 per chip).
SLICES = {"v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
          "v5p-16": "v5p:2x2x2", "v5p-64": "v5p:2x4x4", "v5p-128": "v5p:4x4x4",
          "v6e-16": "v6e:4x4", "v6e-64": "v6e:8x8"}
ROWS, SEQ = 128, 4096
# What is compiled first: each (model, generation, kernels) once on its smallest slice.
PRIORITY = [(m, s, k) for m in ("190m", "1.3b", "450m")
            for s in ("v5e-16", "v5p-16", "v6e-16") for k in (True, False)]
LONG_CONTEXT_AFTER = 3         # compiled after the first rows: 190M on v5e, then on v5p
LONG_CONTEXT = ("190m", "v5e-8", "v5e:2x4", 131072, 1 << 20)


def mesh_for(model: str, slice_name: str) -> dict:
  chips = math.prod(int(d) for d in SLICES[slice_name].split(":")[1].split("x"))
  chip = CHIPS[slice_name.split("-")[0]]
  state = 16 * MODELS[model][1]
  fsdp = 1
  while state / fsdp > chip.hbm_bytes / 4 and fsdp < chips:
    fsdp *= 2
  sequence = max(1, chips // ROWS)
  data = chips // (fsdp * sequence)
  rows_per_step = data * fsdp            # one row per batch shard per micro-step
  return {"chips": chips, "data": data, "fsdp": fsdp, "sequence": sequence,
          "grad_accum_steps": ROWS // rows_per_step}


def overrides(kernels: bool, mesh: dict) -> dict:
  return {"model.dtype": "bfloat16", "train.batch_size": ROWS, "data.seq_len": SEQ,
       "train.grad_accum_steps": mesh["grad_accum_steps"], "mesh.data": mesh["data"],
       "mesh.fsdp": mesh["fsdp"], "mesh.sequence": mesh["sequence"],
       "mamba.kernel": "pallas" if kernels else "xla",
       "sal.kernel": "pallas" if kernels else "xla"}


def key(model, slice_name, kernels):
  return f"{model}|{slice_name}|{'pallas' if kernels else 'xla'}"


def compile_row(model, slice_name, kernels):
  mesh = mesh_for(model, slice_name)
  cfg = load_config(MODELS[model][0], overrides(kernels, mesh))
  report = aot_compile.compile_for_topology(cfg, SLICES[slice_name])
  return {"model": model, "slice": slice_name, "kernels": "pallas" if kernels else "xla",
          "mesh_rule": mesh, "source": "compiled", **report}


def compile_long_context():
  model, slice_name, topology, segment, total = LONG_CONTEXT
  cfg = load_config(MODELS[model][0], {"model.dtype": "bfloat16", "mamba.kernel": "pallas",
                                       "sal.kernel": "pallas"})
  report = aot_compile.compile_for_topology(cfg, topology, step="long_context",
                                            segment_len=segment)
  pred = report.get("prediction") or {}
  if pred:
    pred["document_tokens"] = total
    pred["document_seconds"] = pred["step_seconds"] * total / segment
  return {"model": model, "slice": slice_name, "kernels": "pallas", "source": "compiled",
          **report}


# Step temporaries per token of the train step compiled for an H100 with the Pallas kernels,
# relative to the 190M's (docs/scaling.md, "Per model size, measured": 1.38, 2.45 and 3.42 MiB
# per token): how the activations of a model without a compiled TPU row are scaled.
ACTIVATION_RATIO = {"190m": 1.0, "450m": 2.45 / 1.38, "1.3b": 3.42 / 1.38}


def extrapolate_across_models(model, slice_name, kernels, done: dict):
  """A model with no compiled row on this generation, from the compiled 190M row of the same
  generation and kernels: the state (12 bytes per parameter: fp32 params and two Adam
  moments) divided by fsdp; the 190M's temporaries scaled by ACTIVATION_RATIO; the step time
  by the analytic train FLOPs per token and the micro-steps per chip. Rough: it says so."""
  from taipan_jax.training.flops import train_flops_per_token
  gen = slice_name.split("-")[0]
  mesh = mesh_for(model, slice_name)
  kind = "pallas" if kernels else "xla"
  sources = [r for k, r in done.items() if k.startswith("190m|") and "mesh_rule" in r
             and r["slice"].startswith(gen) and r["kernels"] == kind
             and r["mesh_rule"]["sequence"] == 1]
  # a compiled 190M row first; else one extrapolated from another generation
  sources.sort(key=lambda r: r.get("source") != "compiled")
  if not sources or not sources[0].get("prediction"):
    return None
  src = sources[0]
  src_temps = (src["memory_breakdown_bytes"]["temporaries"] if "memory_breakdown_bytes" in src
               else src["memory_per_device_bytes"] - 12 * MODELS["190m"][1])
  temps = src_temps * ACTIVATION_RATIO[model] / mesh["sequence"]
  memory = 12 * MODELS[model][1] / mesh["fsdp"] + temps
  row = {"model": model, "slice": slice_name, "kernels": src["kernels"], "mesh_rule": mesh,
         "source": f"extrapolated from 190m on {src['slice']} ({src['source']}; state exact, "
                   "activations scaled by the H100 per-token ratio: rough)",
         "fits": memory <= src["hbm_bytes"], "memory_per_device_bytes": memory,
         "hbm_bytes": src["hbm_bytes"]}
  pred = src.get("prediction")
  if pred:
    ratio = (train_flops_per_token(load_config(MODELS[model][0]), SEQ)
             / train_flops_per_token(load_config("taipan_190m"), SEQ))
    scale = ratio * (ROWS * SEQ / mesh["chips"]) / (ROWS * SEQ / src["mesh_rule"]["chips"])
    compute, mem = pred["compute_seconds"] * scale, pred["memory_seconds"] * scale
    step = max(compute, mem)
    row["prediction"] = {"step_seconds": step, "bound": "compute" if compute >= mem else "memory",
                         "compute_seconds": compute, "memory_seconds": mem,
                         "tokens_per_s_per_chip": ROWS * SEQ / step / mesh["chips"]}
  return row


def extrapolate(model, slice_name, kernels, done: dict):
  """The row from the compiled row of the same model, kernels and generation (same per-device
  micro-step and fsdp): memory carries over, the step time scales with the micro-steps."""
  gen = slice_name.split("-")[0]
  mesh = mesh_for(model, slice_name)
  for other in SLICES:
    src = done.get(key(model, other, kernels))
    if (src is None or src["source"] != "compiled" or not other.startswith(gen)
        or src["mesh_rule"]["fsdp"] != mesh["fsdp"] or src["mesh_rule"]["sequence"] != 1):
      continue
    row = {"model": model, "slice": slice_name, "kernels": src["kernels"], "mesh_rule": mesh,
           "source": f"extrapolated from {other}", "fits": src["fits"],
           "memory_per_device_bytes": src["memory_per_device_bytes"],
           "hbm_bytes": src["hbm_bytes"]}
    if mesh["sequence"] > 1:    # half a row per chip: the activations halve, the state not
      state = src["memory_breakdown_bytes"]["arguments"]
      row["memory_per_device_bytes"] = state + (src["memory_per_device_bytes"] - state) / 2
      row["fits"] = row["memory_per_device_bytes"] <= src["hbm_bytes"]
      row["source"] += " (activations halved for sequence=2: rougher)"
    pred = src.get("prediction")
    if pred:
      scale = mesh["grad_accum_steps"] / src["mesh_rule"]["grad_accum_steps"] / mesh["sequence"]
      step = pred["step_seconds"] * scale
      row["prediction"] = {"step_seconds": step, "bound": pred["bound"],
                           "compute_seconds": pred["compute_seconds"] * scale,
                           "memory_seconds": pred["memory_seconds"] * scale,
                           "tokens_per_s_per_chip": ROWS * SEQ / step / mesh["chips"]}
    return row
  return (extrapolate_across_generations(model, slice_name, kernels, done)
          or extrapolate_across_models(model, slice_name, kernels, done))


def extrapolate_across_generations(model, slice_name, kernels, done: dict):
  """From the compiled row of the same model and kernels on another generation, at the same
  per-chip program (one row per micro-step, same fsdp): its per-chip memory against this
  chip's HBM, its per-chip FLOPs and bytes per micro-step against this chip's peak and
  bandwidth. XLA:TPU compiles each generation differently, so memory is approximate."""
  from taipan_jax.training.flops import peak_flops_per_second
  gen = slice_name.split("-")[0]
  chip = CHIPS[gen]
  mesh = mesh_for(model, slice_name)
  for src in done.values():
    if (src.get("source") != "compiled" or src.get("model") != model
        or src.get("kernels") != ("pallas" if kernels else "xla") or "mesh_rule" not in src
        or src["mesh_rule"]["fsdp"] != mesh["fsdp"] or src["mesh_rule"]["sequence"] != 1
        or mesh["sequence"] != 1):
      continue
    memory = src["memory_per_device_bytes"]
    row = {"model": model, "slice": slice_name, "kernels": src["kernels"], "mesh_rule": mesh,
           "source": f"extrapolated from {src['slice']} (another generation's compile, this "
                     "chip's HBM and rates)",
           "fits": memory <= chip.hbm_bytes, "memory_per_device_bytes": memory,
           "hbm_bytes": chip.hbm_bytes}
    scale = mesh["grad_accum_steps"] / src["mesh_rule"]["grad_accum_steps"]
    compute = src["flops"] * scale / peak_flops_per_second(chip.device_kind, "bfloat16")
    mem = src["bytes_accessed"] * scale / chip.hbm_bytes_per_s
    step = max(compute, mem)
    row["prediction"] = {"step_seconds": step, "bound": "compute" if compute >= mem else "memory",
                         "compute_seconds": compute, "memory_seconds": mem,
                         "tokens_per_s_per_chip": ROWS * SEQ / step / mesh["chips"]}
    return row
  return None


def markdown_table(rows: list[dict]) -> str:
  """The docs' table: one line per (model, slice, kernels), compiled rows marked."""
  gib = lambda v: f"{v / 2**30:.1f}"
  out = ["| model | slice | kernels | mesh (data x fsdp x sequence), micro-steps | memory / "
         "HBM per chip (GiB) | fits | compute / memory time (s) | predicted step (s) | "
         "predicted tokens/s per chip | source |", "|---|---|---|---|---|---|---|---|---|---|"]
  order = {m: i for i, m in enumerate(MODELS)}
  slices = {s: i for i, s in enumerate(SLICES)}
  train = [r for r in rows if "mesh_rule" in r]
  for r in sorted(train, key=lambda r: (order[r["model"]], slices[r["slice"]], r["kernels"])):
    m, pred = r["mesh_rule"], r.get("prediction") or {}
    step = f"{pred['step_seconds']:.2f}" if pred else "-"
    both = f"{pred['compute_seconds']:.2f} / {pred['memory_seconds']:.2f}" if pred else "-"
    rate = f"{pred['tokens_per_s_per_chip']:,.0f}" if pred else "-"
    out.append(f"| {r['model']} | {r['slice']} | {r['kernels']} | {m['data']} x {m['fsdp']} x "
               f"{m['sequence']}, {m['grad_accum_steps']} | {gib(r['memory_per_device_bytes'])}"
               f" / {gib(r['hbm_bytes'])} | {'yes' if r['fits'] else '**no**'} | {both} | {step} | "
               f"{rate} | {r['source']} |")
  for r in rows:
    if r.get("step") == "long_context" and r.get("prediction"):
      pred = r["prediction"]
      out.append(f"\nLong context, {r['model']} on {r['slice']} ({r['topology']}), one segment of "
                 f"{r['tokens_per_step']:,} tokens over mesh {r['mesh']}, kernels: "
                 f"{gib(r['memory_per_device_bytes'])} / {gib(r['hbm_bytes'])} GiB per chip "
                 f"({'fits' if r['fits'] else 'does not fit'}), {r['mosaic_kernels']} Mosaic "
                 f"calls, predicted {pred['step_seconds']:.3f} s a segment ({pred['bound']}-"
                 f"bound), {pred.get('document_seconds', 0):.1f} s for "
                 f"{pred.get('document_tokens', 0):,} tokens; compiled in "
                 f"{r['compile_seconds']:.0f} s.")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--max_compiles", type=int, default=100)
  parser.add_argument("--only", default="", help="comma-separated models to compile")
  parser.add_argument("--table", action="store_true", help="print the markdown table of the "
                      "results file and stop")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "tpu_sizing.json"))
  args = parser.parse_args()
  done = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = {r["key"]: r for r in json.load(f)["rows"]}
  if args.table:
    print(markdown_table([r for r in done.values() if r.get("source") != "failed"]))
    return

  def save():
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"jax": jax.__version__, "global_batch_tokens": ROWS * SEQ,
                 "note": "compiled with libtpu for TPU slices on a CPU host; step times are "
                         "predictions from compiled cost, not measurements",
                 "rows": list(done.values())}, f, indent=1)

  todo = PRIORITY[:LONG_CONTEXT_AFTER] + [("long_context",)] + PRIORITY[LONG_CONTEXT_AFTER:]
  only = set(filter(None, args.only.split(",")))
  compiles = 0
  for item in todo:
    k = "190m|v5e-8|long_context" if item == ("long_context",) else key(*item)
    if k in done and done[k]["source"] == "compiled":
      continue
    if only and k.split("|")[0] not in only:
      continue
    if compiles >= args.max_compiles:
      break
    compiles += 1
    start = time.time()
    print(f"compiling {k} ...", flush=True)
    try:
      row = compile_long_context() if item == ("long_context",) else compile_row(*item)
    except Exception as e:          # record the failure; the table says so
      row = {"source": "failed", "error": str(e).strip().splitlines()[0][:400]}
    row["key"] = k
    done[k] = row
    save()
    print(f"  {k}: {row.get('source')} fits={row.get('fits')} "
          f"memory={row.get('memory_per_device_bytes', 0) / 2**30:.2f} GiB "
          f"({time.time() - start:.0f} s)", flush=True)
  for model in MODELS:
    for slice_name in SLICES:
      for kernels in (True, False):
        k = key(model, slice_name, kernels)
        if k not in done or done[k]["source"] != "compiled":
          row = extrapolate(model, slice_name, kernels, done)
          if row is not None:
            done[k] = {**row, "key": k}
  save()
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
