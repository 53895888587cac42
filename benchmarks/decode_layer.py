r"""A Mamba-2 block's decode token, the 190M model's shapes, through the two decode kernels
against XLA (the same ops with implementation='xla'), and the kernels' block choices.

One timed call is a jitted `lax.scan` of `--steps` tokens through `--layers` blocks, each
with its own weights and caches (as in the model's decode step, so no block's weights are
still in L2 when it runs): per block, `ops.mamba2_in_proj` then `ops.mamba2_ssm_out`, the
residual stream carried from one block to the next. Reported: µs per block, and XLA's time
over each variant's.

    python benchmarks/decode_layer.py                 # GPU
Writes benchmarks/results/decode_layer_<device>.json.
"""
from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels.decode.mamba2_in_proj import mamba2_in_proj_gpu
from pallas_kernels.decode.mamba2_ssm_out import mamba2_ssm_out_gpu
from report import write_result
from taipan_jax import ops
from timing import median_ms


def make_layers(key, layers, d, heads, head_dim, d_state, d_conv, dtype):
  """Random weights and caches of `layers` Mamba-2 blocks: lists of dicts of arrays."""
  d_inner = heads * head_dim
  conv_dim = d_inner + 2 * d_state
  k = iter(jax.random.split(key, 12))
  normal = lambda shape, scale, dt=jnp.float32: [
      (scale * jax.random.normal(key, shape, jnp.float32)).astype(dt)
      for key in jax.random.split(next(k), layers)]
  # in_proj transposed, as prepare_decode_weights lays it out before a decode loop.
  weights = dict(norm=normal((d,), 0.1), w_in_t=normal((d_inner + conv_dim + heads, d), d ** -.5,
                                                        dtype),
                 conv_w=normal((d_conv, conv_dim), 0.5), conv_b=normal((conv_dim,), 0.1),
                 dt_bias=normal((heads,), 0.5), A_log=normal((heads,), 0.5),
                 D=normal((heads,), 0.1), gnorm=normal((d_inner,), 0.1),
                 w_out=normal((d_inner, d), d_inner ** -.5, dtype))
  caches = dict(conv=normal((1, d_conv - 1, conv_dim), 1.0, dtype),
                ssm=normal((1, heads, head_dim, d_state), 1.0))
  per_layer = lambda tree: [{name: v[i] for name, v in tree.items()} for i in range(layers)]
  return per_layer(weights), per_layer(caches)


def block(h, w, cache, *, variant, dims, dtype):
  """One block's token: (h, new caches)."""
  impl, in_kw, out_kw = variant
  heads, head_dim, d_state = dims
  d_inner = heads * head_dim
  in_args = (h, w["norm"], w["w_in_t"], cache["conv"], w["conv_w"], w["conv_b"])
  kw = dict(eps=1e-5, dtype=dtype, d_inner=d_inner)
  if impl == "xla":
    zx, conv = ops.mamba2_in_proj(*in_args, implementation="xla", **kw)
  else:
    zx, conv = mamba2_in_proj_gpu(*in_args, **kw, **in_kw)
  out_args = (zx, cache["ssm"], w["dt_bias"], w["A_log"], w["D"], w["gnorm"], w["w_out"], h)
  kw = dict(eps=1e-5, dtype=dtype, group_size=d_inner, heads=heads, head_dim=head_dim,
            n_groups=1, d_state=d_state)
  if impl == "xla":
    h, ssm = ops.mamba2_ssm_out(*out_args, implementation="xla", **kw)
  else:
    h, ssm = mamba2_ssm_out_gpu(*out_args, **kw, **out_kw)
  return h, dict(conv=conv, ssm=ssm)


VARIANTS = {
    "xla": ("xla", {}, {}),
    "kernels": ("pallas", {}, {}),
    "ssm_out block_p 32": ("pallas", {}, dict(block_p=32)),
    "ssm_out block_p 64": ("pallas", {}, dict(block_p=64)),
    "ssm_out 8 warps": ("pallas", {}, dict(num_warps=8)),
    "ssm_out 2 warps": ("pallas", {}, dict(num_warps=2)),
    "ssm_out block_n 128": ("pallas", {}, dict(block_n=128)),
    "in_proj block_n 32": ("pallas", dict(block_n=32), {}),
    "in_proj 4 warps": ("pallas", dict(num_warps=4), {}),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, default=18)
  parser.add_argument("--steps", type=int, default=16, help="tokens per timed call")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  dtype = jnp.bfloat16
  dims = (24, 64, 128)                      # heads, head_dim, d_state of the 190M mixer
  weights, caches = make_layers(jax.random.key(0), args.layers, 768, *dims, 4, dtype)
  h0 = jax.random.normal(jax.random.key(1), (1, 768), jnp.float32)
  rows = []
  for name in args.variants.split(","):
    step = functools.partial(block, variant=VARIANTS[name], dims=dims, dtype=dtype)

    @jax.jit
    def run(h, weights, caches, step=step):
      def token(carry, _):
        h, caches = carry
        new = []
        for w, cache in zip(weights, caches):
          h, cache = step(h, w, cache)
          new.append(cache)
        return (h, new), None
      return jax.lax.scan(token, (h, caches), None, length=args.steps)[0]

    ms = median_ms(lambda: run(h0, weights, caches), reps=args.reps, loops=1)
    us = ms * 1e3 / (args.steps * args.layers)
    rows.append({"variant": name, "us_per_block": us})
  xla = next((r["us_per_block"] for r in rows if r["variant"] == "xla"), None)
  for r in rows:
    if xla:
      r["xla_over_this"] = xla / r["us_per_block"]
    print(f"{r['variant']:>22}  {r['us_per_block']:7.2f} us/block" +
          (f"   xla / this {r['xla_over_this']:.2f}" if xla else ""))
  write_result(args.out, "decode_layer", {
      "benchmark": "decode_layer", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "shapes": "190M Mamba-2 block: d_model 768, 24 heads of 64, d_state 128, bf16, batch 1",
      "layers": args.layers, "steps_per_call": args.steps, "rows": rows})


if __name__ == "__main__":
  main()
