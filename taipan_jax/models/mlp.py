"""SwiGLU feed-forward and the linear-layer initialisers shared by the models."""
from __future__ import annotations

import jax
from flax import nnx

from taipan_jax import ops
from taipan_jax.sharding import with_axes


def uniform_fan_in(scale: float = 1.0):
  """U(+-scale/sqrt(fan_in)): PyTorch's nn.Linear default, which mamba_ssm keeps.

  scale < 1 gives the residual rescale of output projections (docs/spec.md section 2, decision m).
  """
  return nnx.initializers.variance_scaling(scale * scale / 3.0, "fan_in", "uniform")


def dense(d_in: int, d_out: int, *, axes: tuple[str, str], rngs: nnx.Rngs, scale: float = 1.0,
          dtype, param_dtype, use_bias: bool = False) -> nnx.Linear:
  """A Linear whose kernel carries logical axes (input, output) and its bias (output,)."""
  return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=uniform_fan_in(scale),
                    bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs, kernel_metadata=with_axes(*axes),
                    bias_metadata=with_axes(axes[1]))


class SwiGLU(nnx.Module):
  """W_2(silu(W_1 x) * W_3 x), no biases.  x: [..., d_model] -> [..., d_model].

  residual_scale divides W_2's init (1/sqrt(number of residual branches in the model)).
  """

  def __init__(self, d_model: int, hidden: int, *, residual_scale: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.w1 = dense(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.w3 = dense(d_model, hidden, axes=("embed", "mlp"), **kw)
    self.w2 = dense(hidden, d_model, axes=("mlp", "embed"), scale=residual_scale, **kw)

  def __call__(self, x):
    return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))

  def step(self, h, norm, *, implementation: str = "auto", interpret: bool = False):
    """One token per row of the residual block around this layer: h + SwiGLU(norm(h)).

    h: [batch, d_model] fp32 -> [batch, d_model] fp32. norm: the block's RMSNorm, applied
    inside the up-projections' call; both up-projections share one call and the gate, the
    down-projection and the residual another (ops.norm_matvec).
    """
    dtype = self.w2.dtype
    up, gate = ops.norm_matvec(h, norm.weight[...], (self.w3.kernel[...], self.w1.kernel[...]),
                               eps=norm.eps, dtype=dtype, implementation=implementation,
                               interpret=interpret)
    return ops.norm_matvec(up, None, self.w2.kernel[...], gate=gate, residual=h, dtype=dtype,
                           implementation=implementation, interpret=interpret)
