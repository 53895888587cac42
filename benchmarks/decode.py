r"""Per-token decode latency and memory against context length: Taipan vs its anchors, and
the time of a streamed million-token evaluation.

For each model (190M Taipan, Transformer++ with a full KV cache, Mamba-2; bf16, batch 1,
random weights) and each context length L in 1K .. 1M, the decode cache is built as it
stands after L tokens: the ring buffers full, the SSM and conv states set, the Transformer's
KV cache holding L entries (with room for the timed steps). Its contents are random:
a decode step's cost depends on the shapes, not on the values. The timed call is a jitted
`lax.scan` of `--steps` greedy decode steps (the way `Generator` runs), so the latency
excludes Python dispatch. A model that runs out of memory at L is recorded as such, and its
larger contexts are skipped.

A config may carry `@xla` (or another kernel choice) to set mamba.kernel and
sal.kernel: `taipan_190m@xla` decodes through XLA alone, where 'auto' takes the Triton
kernels of pallas_kernels/decode on a GPU at batch 1.

`--eval_tokens=N` also streams N random tokens through the 190M Taipan in segments with
`taipan_jax.inference.long_context.stream_nll` (the `taipan eval --long_context` path) and
reports the wall time.

    python benchmarks/decode.py                             # H100: 1K .. 1M, + 1M-token eval
    python benchmarks/decode.py --configs=tiny --contexts=64,128 --eval_tokens=512  # CPU
Writes benchmarks/results/decode_<device>.json and .png.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import taipan_jax
from taipan_jax.inference.long_context import stream_nll
from taipan_jax.inference.weights import split_for_decode
from taipan_jax.models.attention import KVCache
from taipan_jax.models.mamba2 import Mamba2Cache
from taipan_jax.models.sal import SALCache
from report import result_path
from timing import median_ms


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random(key, shape, dtype):
  """0.1 * N(0, 1) in `dtype`, drawn in one program (no fp32 copy of a large cache)."""
  return (0.1 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def cache_after(model, context: int, room: int, key, batch: int = 1) -> tuple:
  """The model's decode cache for `batch` rows as it stands after `context` tokens (random
  contents), with room for `room` more in full-attention layers."""
  keys = iter(jax.random.split(key, 4 * len(model.layers)))
  rand = lambda x: _random(next(keys), tuple(x.shape), jnp.dtype(x.dtype))
  caches = []
  for layer_cache in model.init_cache(batch):
    if isinstance(layer_cache, SALCache):
      full = jnp.ones_like(layer_cache.filled)
      caches.append(SALCache(k=rand(layer_cache.k), v=rand(layer_cache.v), filled=full,
                             kept=jax.random.uniform(next(keys), full.shape) < 0.15,
                             margin=rand(layer_cache.margin),
                             pos=jnp.full_like(layer_cache.pos, context)))
    elif isinstance(layer_cache, Mamba2Cache):
      caches.append(Mamba2Cache(conv=rand(layer_cache.conv), ssm=rand(layer_cache.ssm)))
    elif isinstance(layer_cache, KVCache):
      shape = (batch, context + room) + layer_cache.k.shape[2:]
      kv = jax.ShapeDtypeStruct(shape, layer_cache.k.dtype)
      caches.append(KVCache(k=rand(kv), v=rand(kv), pos=jnp.full_like(layer_cache.pos, context)))
    else:
      raise TypeError(type(layer_cache))
  return tuple(caches)


def greedy_decoder(model, steps: int, donate_cache: bool = False):
  """(state, decode): decode(state, cache, token [batch]) runs `steps` greedy decode steps in
  one jitted scan and returns the last token, and with donate_cache=True also the updated
  cache, which then takes the donated one's memory (the cache is held once). The weights are
  prepared once, as Generator does: cast and laid out for decode."""
  graphdef, state = split_for_decode(model)

  def decode(state, cache, token):
    m = nnx.merge(graphdef, state)

    def step(carry, _):
      cache, token = carry
      logits, cache = m.step(token, cache)
      return (cache, jnp.argmax(logits, -1).astype(jnp.int32)), None

    (cache, token), _ = jax.lax.scan(step, (cache, token), None, length=steps)
    return (token, cache) if donate_cache else token

  return state, jax.jit(decode, donate_argnums=(1,) if donate_cache else ())


def decode_sweep(name, contexts, args, record, path):
  """Times every context for one model; stops at the first that runs out of memory."""
  # The model's own max_cache_len only sizes init_cache; the timed caches are made here.
  config, _, kernel = name.partition("@")
  overrides = {"model.dtype": "bfloat16"}
  if kernel:          # e.g. taipan_190m@xla: XLA alone, no decode kernels
    overrides.update({"mamba.kernel": kernel, "sal.kernel": kernel})
  cfg = taipan_jax.load_config(config, overrides)
  model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
  model.eval()
  state, decode = greedy_decoder(model, args.steps)

  token = jnp.zeros((1,), jnp.int32)
  for context in contexts:
    try:
      cache = cache_after(model, context, args.steps, jax.random.key(1))
      cache_bytes = sum(x.nbytes for x in jax.tree.leaves(cache))
      ms = median_ms(lambda cache=cache: decode(state, cache, token), reps=args.reps, loops=1)
      stats = jax.devices()[0].memory_stats() or {}
      row = {"model": name, "context": context, "ms_per_token": ms / args.steps,
             "cache_mib": cache_bytes / 2**20,
             "bytes_in_use_gib": stats.get("bytes_in_use", 0) / 2**30}
      del cache
    except Exception as e:  # noqa: BLE001 -- out of memory ends this model's sweep
      if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
        raise
      row = {"model": name, "context": context, "error": "out of memory"}
    record["rows"].append(row)
    print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()), flush=True)
    with open(path + ".json", "w") as f:
      json.dump(record, f, indent=1)
    if "error" in row:
      break


def stream_eval(args) -> dict:
  cfg = taipan_jax.load_config(args.eval_config, {"model.dtype": "bfloat16"})
  model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, args.eval_tokens + 1)
  # Compile on one short segment first, so the figure is the evaluation's own time.
  stream_nll(model, tokens[:args.segment_len + 1], segment_len=args.segment_len, log=None)
  start = time.perf_counter()
  nll = stream_nll(model, tokens, segment_len=args.segment_len)
  seconds = time.perf_counter() - start
  return {"config": args.eval_config, "tokens": args.eval_tokens,
          "segment_len": args.segment_len, "seconds": seconds,
          "tokens_per_second": args.eval_tokens / seconds, "mean_nll": float(nll.mean()),
          "peak_gib": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
          / 2**30}


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
  for name in dict.fromkeys(r["model"] for r in rows):
    ok = [r for r in rows if r["model"] == name and "ms_per_token" in r]
    a.plot([r["context"] for r in ok], [r["ms_per_token"] for r in ok], marker="o", label=name)
    b.plot([r["context"] for r in ok], [r["cache_mib"] for r in ok], marker="o", label=name)
  for ax, label in ((a, "ms per token"), (b, "decode cache (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  a.legend(fontsize=8)
  fig.suptitle(f"batch-1 decode, bf16, {jax.devices()[0].device_kind}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs",
                      default="taipan_190m,transformer_190m,mamba2_190m,taipan_190m@xla")
  parser.add_argument("--contexts", default=",".join(str(1024 << i) for i in range(11)))
  parser.add_argument("--steps", type=int, default=64, help="decode steps per timed call")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--eval_tokens", type=int, default=1 << 20,
                      help="stream this many tokens through --eval_config (0: skip)")
  parser.add_argument("--eval_config", default="taipan_190m")
  parser.add_argument("--segment_len", type=int, default=65536)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  device = jax.devices()[0]
  record = {"benchmark": "decode", "device": device.device_kind, "jax": jax.__version__,
            "steps_per_call": args.steps, "rows": []}
  contexts = [int(c) for c in args.contexts.split(",")]
  path = result_path(args.out, "decode", suffix="")     # + .json and .png
  if args.eval_tokens:      # first: its peak memory is then its own, not a sweep's
    record["stream_eval"] = stream_eval(args)
    print("stream eval:", json.dumps(record["stream_eval"]))
  for name in args.configs.split(","):
    decode_sweep(name, contexts, args, record, path)
  by = {(r["model"], r["context"]): r.get("ms_per_token") for r in record["rows"]}
  base = args.configs.split(",")[0]
  print(f"\n{'context':>9}" + "".join(f"{n:>18}" for n in args.configs.split(","))
        + "   anchor / " + base)
  for c in contexts:
    cells = [by.get((n, c)) for n in args.configs.split(",")]
    ratios = [f"{x / cells[0]:.2f}" if x and cells[0] else "-" for x in cells[1:]]
    print(f"{c:>9}" + "".join(f"{x:>15.3f} ms" if x else f"{'-':>18}" for x in cells)
          + "   " + " ".join(ratios))
  first, last = by.get((base, contexts[0])), by.get((base, contexts[-1]))
  if first and last:
    record[f"{base}_last_over_first"] = last / first
    print(f"{base}: {contexts[-1]} vs {contexts[0]} tokens of context: x{last / first:.3f}")
  with open(path + ".json", "w") as f:
    json.dump(record, f, indent=1)
  try:
    plot(record["rows"], path + ".png")
    print(f"wrote {path}.json and {path}.png")
  except ImportError:
    print(f"wrote {path}.json (no matplotlib: no plot)")


if __name__ == "__main__":
  main()
