"""Mamba-2 mixer and block (docs/spec.md section 2), with a parallel forward and a decode step."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from taipan_jax import ops
from taipan_jax.models.layer import LayerOutput
from taipan_jax.models.mlp import dense
from taipan_jax.models.norms import GatedRMSNorm, RMSNorm
from taipan_jax.sharding import with_axes


@struct.dataclass
class Mamba2Cache:
  """Decode state of one Mamba-2 layer; its size does not depend on the sequence length.

  conv: [batch, d_conv - 1, conv_dim] the last pre-convolution xBC inputs.
  ssm: [batch, heads, head_dim, d_state] fp32.
  """
  conv: jax.Array
  ssm: jax.Array


class DecodeLayout(nnx.Variable):
  """A weight copied into the layout a decode kernel reads (Mamba2Mixer.prepare_decode)."""


def _dt_bias_init(key, heads, dt_min, dt_max, floor):
  """dt log-uniform in [dt_min, dt_max], floored; dt_bias = softplus^{-1}(dt)."""
  u = jax.random.uniform(key, (heads,), jnp.float32)
  dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
  dt = jnp.maximum(dt, floor)
  return dt + jnp.log(-jnp.expm1(-dt))


class Mamba2Mixer(nnx.Module):
  """The Mamba-2 mixer.  u: [batch, seq, d_model] -> [batch, seq, d_model]."""

  def __init__(self, cfg, *, residual_scale: float, rngs: nnx.Rngs):
    m, mb = cfg.model, cfg.mamba
    d = m.d_model
    self.d_inner = mb.expand * d
    self.heads = self.d_inner // mb.head_dim
    self.head_dim = mb.head_dim
    self.n_groups = mb.n_groups
    self.d_state = mb.d_state
    self.d_conv = mb.d_conv
    self.chunk_size = mb.chunk_size
    self.kernel = mb.kernel                 # how the ops run: ops/dispatch.py
    self.interpret = mb.interpret
    self.conv_dim = self.d_inner + 2 * mb.n_groups * mb.d_state
    self.dtype = jnp.dtype(m.dtype)
    pdt = jnp.dtype(m.param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=pdt, rngs=rngs)

    # Fused projection, split in the order z | x B C | dt (mamba_ssm's layout).
    # Its columns are not split: splitting them would cut across the parts ('mamba_in').
    self.in_proj = dense(d, self.d_inner + self.conv_dim + self.heads, axes=("embed", "mamba_in"),
                         **kw)
    bound = 1.0 / math.sqrt(mb.d_conv)
    self.conv_weight = nnx.Param(jax.random.uniform(
        rngs.params(), (mb.d_conv, self.conv_dim), pdt, -bound, bound),
        **with_axes("conv_width", "mamba_conv"))
    self.conv_bias = nnx.Param(jax.random.uniform(
        rngs.params(), (self.conv_dim,), pdt, -bound, bound), **with_axes("mamba_conv"))
    heads = with_axes("mamba_heads")
    self.dt_bias = nnx.Param(_dt_bias_init(rngs.params(), self.heads, mb.dt_min, mb.dt_max,
                                           mb.dt_init_floor).astype(pdt), **heads)
    a = jax.random.uniform(rngs.params(), (self.heads,), jnp.float32, mb.a_init_min,
                           mb.a_init_max)
    self.A_log = nnx.Param(jnp.log(a).astype(pdt), **heads)
    self.D = nnx.Param(jnp.ones((self.heads,), pdt), **heads)
    self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // mb.n_groups,
                             eps=m.norm_eps, dtype=self.dtype, param_dtype=pdt)
    self.out_proj = dense(self.d_inner, d, axes=("mamba_inner", "embed"), scale=residual_scale,
                          **kw)

  @property
  def kernels(self) -> dict:
    """The ops' implementation and interpret arguments (plain attributes: a graphdef is
    hashed, a dict is not)."""
    return dict(implementation=self.kernel, interpret=self.interpret)

  def _split_proj(self, zxbcdt):
    z, xbc, dt = jnp.split(zxbcdt, [self.d_inner, self.d_inner + self.conv_dim], axis=-1)
    return z, xbc, dt

  def _split_xbc(self, xbc):
    gn = self.n_groups * self.d_state
    x, B, C = jnp.split(xbc, [self.d_inner, self.d_inner + gn], axis=-1)
    lead = xbc.shape[:-1]
    return (x.reshape(*lead, self.heads, self.head_dim),
            B.reshape(*lead, self.n_groups, self.d_state),
            C.reshape(*lead, self.n_groups, self.d_state))

  def _gate_and_project(self, y, x, z):
    y = y.astype(jnp.float32) + x.astype(jnp.float32) * self.D[...].astype(jnp.float32)[:, None]
    y = y.reshape(*y.shape[:-2], self.d_inner)
    return self.out_proj(self.norm(y, z))

  def init_cache(self, batch_size: int) -> Mamba2Cache:
    return Mamba2Cache(
        conv=jnp.zeros((batch_size, self.d_conv - 1, self.conv_dim), self.dtype),
        ssm=jnp.zeros((batch_size, self.heads, self.head_dim, self.d_state), jnp.float32))

  def __call__(self, u, *, segment_ids=None, cache: Mamba2Cache | None = None,
               return_cache: bool = False):
    """u: [batch, seq, d_model] -> out [batch, seq, d_model] (and the cache after seq).

    segment_ids: optional [batch, seq] int, contiguous runs = packed documents: neither the
      convolution nor the SSD state crosses a change of id.
    cache: continue from this cache (its conv inputs and SSM state) instead of zeros.
    """
    if segment_ids is not None and (return_cache or cache is not None):
      raise ValueError("a decode cache continues one document: segment_ids cannot be combined "
                       "with cache or return_cache; prefill each document in its own row")
    b, l, _ = u.shape
    z, xbc, dt = self._split_proj(self.in_proj(u))
    # Causal depthwise convolution: left pad d_conv - 1, one shifted product per tap.
    # Tap i reads position t - (k - 1 - i); zeros before position 0.
    k = self.d_conv
    # Zeros before position 0; under context parallelism, the previous device's last inputs.
    # On the first device, the cached inputs when continuing (context parallelism: each
    # further device takes its predecessor's last inputs).
    halo = ops.left_halo(xbc, k - 1, before=None if cache is None else cache.conv)
    extended = jnp.concatenate([halo, xbc], axis=1)
    padded = extended.astype(jnp.float32)
    w = self.conv_weight[...].astype(jnp.float32)
    taps = [padded[:, i:i + l] for i in range(k)]
    if segment_ids is not None:
      # A tap reading another document reads zero, as before position 0 of a lone document.
      # The halo's ids come with its inputs (zeros before position 0, where the inputs are
      # zero already, so their ids do not matter).
      seg = jnp.concatenate([ops.left_halo(segment_ids, k - 1), segment_ids], axis=1)
      taps = [jnp.where((seg[:, i:i + l] == segment_ids)[..., None], tap, 0.0)
              for i, tap in enumerate(taps)]
    conv = sum(tap * w[i] for i, tap in enumerate(taps)) + self.conv_bias[...]
    x, B, C = self._split_xbc(jax.nn.silu(conv).astype(self.dtype))
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
    A = -jnp.exp(self.A_log[...].astype(jnp.float32))
    y, state = ops.ssd(x, dt, A, B, C, chunk_size=self.chunk_size, return_final_state=True,
                       initial_state=None if cache is None else cache.ssm,
                       segment_ids=segment_ids, **self.kernels)
    out = self._gate_and_project(y, x, z)
    if not return_cache:
      return out
    # The last d_conv - 1 inputs (zeros before position 0) continue the convolution.
    tail = extended[:, l:]
    return out, Mamba2Cache(conv=ops.from_last_device(tail.astype(self.dtype)),
                            ssm=ops.from_last_device(state))

  def prepare_decode(self):
    """Stores in_proj transposed, [outputs, d_model], the layout in which the decode kernel
    reads whole rows (ops.mamba2_in_proj). For a copy of the model prepared once before
    decoding (inference.weights.prepare_decode_weights, which Generator applies when it is
    built), so that the transpose does not run once per token; `step` works without it."""
    self.in_proj_t = DecodeLayout(self.in_proj.kernel[...].T)

  def step(self, h, cache: Mamba2Cache, norm):
    """One token of the block around this mixer.  h: [batch, d_model] the residual stream
    (fp32) -> (h + out, new cache).

    norm: the block's RMSNorm, applied to h inside the in-projection's call; the residual is
    added by the out-projection's (ops.decode).
    """
    impl = self.kernels
    prepared = getattr(self, "in_proj_t", None)
    w_t = self.in_proj.kernel[...].T if prepared is None else prepared[...]
    zxbcdt, conv = ops.mamba2_in_proj(
        h, norm.weight[...], w_t, cache.conv, self.conv_weight[...],
        self.conv_bias[...], eps=norm.eps, dtype=self.dtype, d_inner=self.d_inner,
        **impl)
    out, ssm = ops.mamba2_ssm_out(
        zxbcdt, cache.ssm, self.dt_bias[...], self.A_log[...], self.D[...], self.norm.weight[...],
        self.out_proj.kernel[...], h, eps=self.norm.eps, dtype=self.dtype,
        group_size=self.norm.group_size, heads=self.heads, head_dim=self.head_dim,
        n_groups=self.n_groups, d_state=self.d_state, **impl)
    return out, Mamba2Cache(conv=conv, ssm=ssm)


class Mamba2Block(nnx.Module):
  """h + Mamba2Mixer(RMSNorm(h)), residual stream in fp32.  h: [batch, seq, d_model]."""

  def __init__(self, cfg, *, residual_scale: float, rngs: nnx.Rngs):
    self.norm = RMSNorm(cfg.model.d_model, eps=cfg.model.norm_eps,
                        dtype=jnp.dtype(cfg.model.dtype),
                        param_dtype=jnp.dtype(cfg.model.param_dtype))
    self.mixer = Mamba2Mixer(cfg, residual_scale=residual_scale, rngs=rngs)

  def init_cache(self, batch_size: int) -> Mamba2Cache:
    return self.mixer.init_cache(batch_size)

  selects = False

  def __call__(self, h, *, token_mask=None, segment_ids=None, gumbel_key=None, tau=None,
               forced_rate=None, cache: Mamba2Cache | None = None, return_cache: bool = False,
               token_ids=None) -> LayerOutput:
    """h: [batch, seq, d_model]; segment_ids: optional [batch, seq] int (packed documents);
    cache: continue from it (Mamba2Mixer). The layer interface (models/layer.py); token_mask,
    gumbel_key, tau, forced_rate and token_ids are unused."""
    out = self.mixer(self.norm(h), segment_ids=segment_ids, cache=cache,
                     return_cache=return_cache)
    out, cache = out if return_cache else (out, None)
    return LayerOutput(h + out.astype(jnp.float32), {}, cache)

  def step(self, h, cache: Mamba2Cache, token_ids=None) -> LayerOutput:
    """One token.  h: [batch, d_model] fp32 -> h + mixer(norm(h)), no aux, new cache."""
    h, cache = self.mixer.step(h, cache, self.norm)
    return LayerOutput(h, {}, cache)

  def split_refusal(self) -> str | None:
    return None
