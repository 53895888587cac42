"""Small builders shared by the model tests (kernel inputs: kernel_inputs.py)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import taipan_jax


VOCAB = 100   # not a multiple of pad_vocab_multiple: the padded rows are exercised


def tiny_config(**overrides):
  """The tiny config (fp32) with a 100-token vocabulary and `a__b=v` overrides of `a.b`."""
  overrides = {"model__vocab_size": VOCAB, **overrides}
  return taipan_jax.load_config("tiny", {k.replace("__", "."): v for k, v in overrides.items()})


def build(cfg, seed=0):
  return taipan_jax.build_model(cfg, rngs=nnx.Rngs(seed))


def randomize_gates(model, rng, scale=3.0):
  """Gate weights large enough that deterministic selection picks a real mix of tokens."""
  for layer in model.layers:
    if hasattr(layer, "gate"):
      out = layer.gate.out
      out.kernel[...] = jnp.asarray(rng.standard_normal(out.kernel.shape) * scale / np.sqrt(
          out.kernel.shape[0]), out.kernel.dtype)
      out.bias[...] = jnp.zeros_like(out.bias[...])


def random_tokens(rng, batch, seq, vocab=VOCAB):
  return jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)


def compiled_forward(model, **kwargs):
  """tokens -> model(tokens, **kwargs), compiled (eager op-by-op dispatch is slow on the CPU);
  one compilation per tokens shape, however many calls."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens, **kwargs))
  return lambda tokens: fn(state, tokens)


def jit_forward(model, tokens, **kwargs):
  """model(tokens, **kwargs) compiled once (eager op-by-op dispatch is slow on the CPU)."""
  return compiled_forward(model, **kwargs)(tokens)
