r"""Decode throughput at batch 1, 8 and 64: tokens/s and memory against context length.

For each model (190M Taipan, Transformer++ with a full KV cache, Mamba-2; bf16, random
weights), each batch B and each context L, the decode cache of B rows is built as it stands
after L tokens (decode.py's `cache_after`: random contents, full ring buffers, a KV cache of
L entries for Transformer++), and a jitted `lax.scan` of `--steps` greedy decode steps is
timed. Throughput is B * steps / time. A (model, batch) whose cache does not fit is recorded
as out of memory and its longer contexts are skipped.

Selection rate: Taipan's SALs select by the evaluation rule in force
(`sal.inference_selection`), and with random weights its rate is whatever the untrained gate
gives. So the rate is set explicitly: before timing, each SAL's gate bias is shifted until
that rule, in the model's own evaluation forward over a random 4096-token prompt, selects
`--select_rate` (default 0.15, the trained rate) of the tokens; the fractions that forward
then measures are recorded with each row.

    python benchmarks/decode_batch.py                        # H100/H200
    python benchmarks/decode_batch.py --configs=tiny --batches=1,4 --contexts=64,256 --steps=4
Writes benchmarks/results/decode_batch_<device>.json; prints tokens/s and Taipan's ratio to
each anchor.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import taipan_jax
from decode import cache_after, greedy_decoder
from report import result_path, write_result
from timing import median_ms


def set_selection_rate(model, rate: float, prompt_len: int = 4096, seed: int = 0,
                       iters: int = 24):
  """Shifts each SAL's gate bias (the "select" score) until the model's evaluation forward
  selects `rate` of a random prompt's tokens at that SAL, whatever `sal.inference_selection`
  rule is in force (bisection: more bias selects more under every rule that reads the
  margin's size). SALs are set in order, each seeing the stream its predecessors make.
  Returns the selected fraction per SAL that the forward then measures."""
  sals = [layer for kind, layer in zip(model.kinds, model.layers) if kind == "s"]
  if not sals:
    return []
  tokens = jnp.asarray(np.random.default_rng(seed).integers(0, model.vocab_size,
                                                            (1, prompt_len)), jnp.int32)
  model.eval()
  graphdef = nnx.graphdef(model)
  measure = jax.jit(lambda state: nnx.merge(graphdef, state)(tokens)[1]["selected_fraction"]
                    .mean(-1))
  for n, layer in enumerate(sals):
    bias = layer.gate.out.bias
    start = bias[...]
    lo, hi = -30.0, 30.0
    for _ in range(iters):
      mid = (lo + hi) / 2
      bias[...] = start.at[1].add(mid)
      if float(measure(nnx.state(model))[n]) < rate:
        lo = mid
      else:
        hi = mid
    bias[...] = start.at[1].add(hi)
  return [float(f) for f in measure(nnx.state(model))]


def sweep(name, batches, contexts, args, record):
  cfg = taipan_jax.load_config(name, {"model.dtype": "bfloat16"})
  model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
  fractions = set_selection_rate(model, args.select_rate)
  model.eval()
  # The cache is donated and the updated one passed back, so memory holds it once.
  state, decode = greedy_decoder(model, args.steps, donate_cache=True)

  for batch in batches:
    token = jnp.zeros((batch,), jnp.int32)
    for context in contexts:
      row = {"model": name, "batch": batch, "context": context}
      if fractions:
        row["selected_fraction_per_sal"] = fractions
      try:
        # Room for every timed call's tokens in a full-attention cache.
        held = [cache_after(model, context, args.steps * (args.reps + 2), jax.random.key(1),
                            batch=batch)]
        cache_gib = sum(x.nbytes for x in jax.tree.leaves(held[0])) / 2**30

        def call():
          token_out, held[0] = decode(state, held[0], token)
          return token_out

        ms = median_ms(call, reps=args.reps, loops=1)
        stats = jax.devices()[0].memory_stats() or {}
        row.update({"ms_per_step": ms / args.steps,
                    "tokens_per_second": batch * args.steps / (ms / 1e3),
                    "cache_gib": cache_gib,
                    "bytes_in_use_gib": stats.get("bytes_in_use", 0) / 2**30})
        del held
      except Exception as e:  # noqa: BLE001 -- out of memory ends this batch's sweep
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
          raise
        row["error"] = "out of memory"
      record["rows"].append(row)
      print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in row.items() if k != "selected_fraction_per_sal"), flush=True)
      with open(result_path(args.out, args.stem), "w") as f:    # kept if the run is cut off
        json.dump(record, f, indent=1)
      if "error" in row:
        break


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="taipan_190m,transformer_190m,mamba2_190m")
  parser.add_argument("--batches", default="1,8,64")
  parser.add_argument("--contexts", default="4096,16384,65536,262144,1048576")
  parser.add_argument("--steps", type=int, default=32, help="decode steps per timed call")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--select_rate", type=float, default=0.15)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--stem", default="decode_batch")
  args = parser.parse_args()
  device = jax.devices()[0]
  record = {"benchmark": "decode_batch", "device": device.device_kind, "jax": jax.__version__,
            "steps_per_call": args.steps, "select_rate": args.select_rate, "rows": []}
  names = args.configs.split(",")
  batches = [int(b) for b in args.batches.split(",")]
  contexts = [int(c) for c in args.contexts.split(",")]
  for name in names:
    sweep(name, batches, contexts, args, record)
  rate = {(r["model"], r["batch"], r["context"]): r.get("tokens_per_second")
          for r in record["rows"]}
  base = names[0]
  print(f"\n{'batch':>6}{'context':>9}" + "".join(f"{n:>18}" for n in names)
        + "".join(f"  {base}/{n}" for n in names[1:]))
  for b in batches:
    for c in contexts:
      cells = [rate.get((n, b, c)) for n in names]
      ratios = [f"{cells[0] / x:.2f}" if x and cells[0] else ("inf (OOM)" if cells[0] else "-")
                for x in cells[1:]]
      print(f"{b:>6}{c:>9}" + "".join(f"{x:>14.0f} t/s" if x else f"{'OOM/-':>18}"
                                      for x in cells) + "  " + "  ".join(ratios))
  write_result(args.out, args.stem, record)


if __name__ == "__main__":
  main()
