"""Long-context evaluation: a document streamed through the model in segments, the decode
cache carried between them, and perplexity reported per position bucket (the paper's Fig. 1).

Each segment goes through the parallel chunked forward continuing from the cache, so the
result equals one forward over the whole document (tests/test_inference.py) while the
device only ever holds one segment's activations and the cache, whose size is fixed by the
config. Logits are formed a slice of the segment at a time: no [seq, vocab] array.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from taipan_jax.ops.context_parallel import sequence_parallel
from taipan_jax.sharding.context_parallel import split_refusal

_LOGIT_SLICE = 2048


def position_buckets(n: int, first: int = 1024) -> list[tuple[int, int]]:
  """[0, first), [first, 2 first), [2 first, 4 first), ... covering positions 0 .. n-1."""
  edges = [0, first]
  while edges[-1] < n:
    edges.append(edges[-1] * 2)
  return [(lo, min(hi, n)) for lo, hi in zip(edges[:-1], edges[1:]) if lo < n]


_SEGMENT_FNS: dict = {}


def _segment_nll(model, tokens, targets, cache):
  """(nll [1, L] fp32, cache) of one segment continuing from cache."""
  h, _, cache = model(tokens, cache=cache, return_cache=True, return_hidden=True)
  l = tokens.shape[1]
  piece = min(l, _LOGIT_SLICE)
  pad = -l % piece              # the hidden states (not the tokens) are padded
  hs = jnp.pad(h[0], ((0, pad), (0, 0))).reshape(-1, piece, h.shape[-1])
  ts = jnp.pad(targets[0], (0, pad)).reshape(-1, piece)

  def nll(args):
    hp, tp = args
    logits = model.logits(hp)
    return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tp[:, None], -1)[:, 0]

  return jax.lax.map(nll, (hs, ts)).reshape(1, -1)[:, :l], cache


def _segment_fn(graphdef, mesh: Mesh | None):
  """(state, tokens [1, L], targets [1, L], cache) -> (nll [1, L] fp32, cache), jitted once
  per model structure and mesh. With a mesh, the segment's length is split over its
  'sequence' axis (context parallelism); the cache goes in and comes out whole."""
  if (graphdef, mesh) in _SEGMENT_FNS:
    return _SEGMENT_FNS[graphdef, mesh]

  def run(state, tokens, targets, cache):
    return _segment_nll(nnx.merge(graphdef, state), tokens, targets, cache)

  if mesh is None:
    fn = jax.jit(run)
  else:
    def shard(state, tokens, targets, cache):
      with sequence_parallel("sequence"):
        return run(state, tokens, targets, cache)

    split = P(None, "sequence")
    fn = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(P(), split, split, P()),
                               out_specs=(split, P()), check_vma=False))
  _SEGMENT_FNS[graphdef, mesh] = fn
  return fn


def _context_parallel_mesh(model, mesh):
  """The mesh to split segments over: `mesh` itself, or for "auto" every device when there
  are several and the model can be split (sharding.context_parallel.split_refusal)."""
  if mesh != "auto":
    return mesh
  if jax.device_count() < 2 or split_refusal(model) is not None:
    return None
  return Mesh(np.asarray(jax.devices()), ("sequence",))


def stream_nll(model, tokens, *, segment_len: int = 16384, mesh: Mesh | None | str = "auto",
               log: Callable[[str], None] | None = print) -> np.ndarray:
  """Negative log-likelihood of tokens[1:] given everything before, one segment at a time.

  tokens: [n] int ids of one document (n >= 2). Returns [n - 1] float32: entry t is the NLL
  of tokens[t + 1].
  mesh: a Mesh with a 'sequence' axis splits each segment's length over its devices
    (context parallelism: memory per device follows segment_len / devices); "auto" (the
    default) uses every device when there are several and the model allows it (no full
    attention, no sal.inference_capacity); None runs on one device. A segment whose share
    per device would be shorter than the halo a device takes from its predecessor (the SAL
    window) runs on one device.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1 or tokens.size < 2:
    raise ValueError(f"a long-context evaluation needs one document of >= 2 tokens; got "
                     f"shape {tokens.shape}")
  if segment_len < 1:
    raise ValueError(f"segment_len={segment_len} must be >= 1")
  model.eval()
  if "a" in model.kinds and tokens.size - 1 > model.config.attention.max_cache_len:
    raise ValueError(f"{tokens.size - 1} tokens exceed the full-attention cache "
                     f"(attention.max_cache_len={model.config.attention.max_cache_len}); fix: "
                     "raise it or evaluate fewer tokens")
  mesh = _context_parallel_mesh(model, mesh)
  graphdef, state = nnx.split(model)
  one_device = _segment_fn(graphdef, None)
  halo = max(model.config.mamba.d_conv - 1,
             model.config.sal.window if "s" in model.kinds else 0)
  split, ways = None, 1
  if mesh is not None and -(-segment_len // mesh.shape["sequence"]) >= halo:
    split, ways = _segment_fn(graphdef, mesh), mesh.shape["sequence"]
    segment_len = -(-segment_len // ways) * ways      # full segments split evenly
  inputs, targets = tokens[:-1], tokens[1:]
  n = inputs.size
  cache = model.init_cache(1)
  out = np.empty(n, np.float32)
  start_time, last_log = time.perf_counter(), 0.0
  if log and ways > 1:
    log(f"  each segment of {segment_len:,} tokens split over {ways} devices")
  for start in range(0, n, segment_len):
    stop = min(start + segment_len, n)
    pad = -(stop - start) % ways                      # only the last segment: its end
    run = split if split is not None and (stop - start + pad) // ways >= halo else one_device
    if run is one_device:
      pad = 0
    seg = lambda t: jnp.asarray(np.pad(t[start:stop], (0, pad))[None], jnp.int32)
    nll, cache = run(state, seg(inputs), seg(targets), cache)
    out[start:stop] = np.asarray(nll[0, :stop - start])
    elapsed = time.perf_counter() - start_time
    if log and (elapsed - last_log > 10 or stop == n):
      last_log = elapsed
      rate = stop / elapsed
      log(f"  {stop:,}/{n:,} tokens  {rate:,.0f} tokens/s  ETA {(n - stop) / rate:.0f}s  "
          f"ppl so far {math.exp(float(out[:stop].mean())):.3f}")
  return out


def fresh_start_control(model, tokens, nll: np.ndarray, starts, *, segment_len: int = 16384,
                        probe: int = 1024, mesh: Mesh | None | str = "auto") -> list[dict]:
  """Position or text? For each start s, streams tokens[s:] again from an empty cache and
  compares its perplexity with the full stream's over the same targets (tokens s+1 ..):
  over the first `probe` of them, where the carried state could matter most, and over all.

  tokens: [n] the document streamed; nll: [n - 1] stream_nll(model, tokens) (nll[i] scores
  token i + 1). A late bucket that is as hard from a fresh cache as in the stream is hard
  because of its text, not its position. Returns one row per (start, span).
  """
  tokens = np.asarray(tokens)
  if nll.shape != (tokens.size - 1,):
    raise ValueError(f"nll {nll.shape} must be stream_nll(model, tokens) over these "
                     f"{tokens.size} tokens, [{tokens.size - 1}]")
  outside = [s for s in starts if not 0 < s < tokens.size - 1]
  if outside:                    # checked before any start is streamed
    raise ValueError(f"fresh starts {outside} must lie inside the document (0 < s < "
                     f"{tokens.size - 1})")
  rows = []
  for s in starts:
    fresh = stream_nll(model, tokens[s:], segment_len=segment_len, mesh=mesh, log=None)
    for hi in sorted({min(probe, fresh.size), fresh.size}):
      rows.append({"start": s, "from": s, "to": s + hi, "tokens": hi,
                   "ppl_streamed": math.exp(float(nll[s:s + hi].mean())),
                   "ppl_fresh_cache": math.exp(float(fresh[:hi].mean()))})
  return rows


def bucket_table(nll: np.ndarray, first: int = 1024) -> list[dict]:
  """Per position bucket: positions [lo, hi), tokens, mean NLL, perplexity."""
  rows = []
  for lo, hi in position_buckets(nll.size, first):
    mean = float(nll[lo:hi].mean())
    rows.append({"from": lo, "to": hi, "tokens": hi - lo, "nll": mean, "ppl": math.exp(mean)})
  return rows


def write_report(rows: list[dict], path_stem: str, *, title: str, meta: dict,
                 train_len: int | None = None) -> tuple[str, str]:
  """Writes <stem>.json and <stem>.png (perplexity against position, log2 x axis)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
  with open(path_stem + ".json", "w") as f:
    json.dump({**meta, "buckets": rows}, f, indent=1)
  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.plot([r["to"] for r in rows], [r["ppl"] for r in rows], marker="o")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("position (bucket end)")
  ax.set_ylabel("perplexity")
  ax.set_title(title, fontsize=9)
  if train_len:
    ax.axvline(train_len, color="gray", ls="--", lw=1)
    ax.text(train_len, ax.get_ylim()[1], " training length", va="top", fontsize=8,
            color="gray")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path_stem + ".png", dpi=120)
  plt.close(fig)
  return path_stem + ".json", path_stem + ".png"
