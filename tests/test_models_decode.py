"""Decoding token by token (and prefill then decode) reproduces the parallel forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import build, jit_forward, random_tokens, randomize_gates, tiny_config


@pytest.fixture(autouse=True)
def full_precision_fp32_matmuls():
  """The fp32 tolerances below (1e-4) hold for fp32 dots; XLA's default on a GPU is TF32,
  which misses them (on the CPU the setting changes nothing)."""
  with jax.default_matmul_precision("highest"):
    yield


# Each layer kind alone, Taipan, and the SAL variants that change the cache logic.
VARIANTS = {
    "mamba2": dict(model__pattern="m"),
    "attention": dict(model__pattern="a"),
    "sal": dict(model__pattern="s", sal__window=5),
    "taipan": dict(),
    "jamba": dict(model__pattern="mma"),
    "kv_selected_only": dict(sal__kv_selected_only=True, sal__window=6),
    "sal_rope": dict(sal__rope=True, sal__window=7),
    "inference_cap": dict(sal__inference_capacity=2, sal__window=6),
    "swa_hybrid": dict(sal__selection="all", sal__window=9),
    "groups_and_gate_mlp": dict(mamba__n_groups=2, mamba__head_dim=32, sal__gate_hidden=16,
                                mamba__d_conv=2),
}


def decode_all(model, tokens, cache=None, start=0):
  if cache is None:
    cache = model.init_cache(tokens.shape[0])
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, token, cache: nnx.merge(graphdef, state).step(token, cache))
  outs = []
  for t in range(start, tokens.shape[1]):
    logits, cache = step(state, tokens[:, t], cache)
    outs.append(logits)
  return jnp.stack(outs, axis=1), cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_equals_parallel(rng, variant):
  model = build(tiny_config(**VARIANTS[variant]))
  randomize_gates(model, rng)
  model.eval()
  tokens = random_tokens(rng, 2, 29)
  logits, aux = jit_forward(model, tokens, return_masks=True)
  if model.num_sal and variant != "swa_hybrid":
    frac = float(aux["select_masks"].mean())
    assert 0.05 < frac < 0.95, f"selection not mixed ({frac:.2f}): test would be vacuous"
  decoded, _ = decode_all(model, tokens)
  err = float(jnp.abs(decoded - logits).max())
  print(f"decode vs parallel, {variant}: max abs logit error {err:.2e}")
  assert err < 1e-4, f"{variant}: decode vs parallel max abs error {err:.2e}"


@pytest.mark.parametrize("variant", ["taipan", "jamba", "kv_selected_only", "inference_cap"])
@pytest.mark.parametrize("prompt_len", [1, 3, 17])
def test_prefill_then_decode_equals_parallel(rng, variant, prompt_len):
  model = build(tiny_config(**VARIANTS[variant]))
  randomize_gates(model, rng)
  model.eval()
  tokens = random_tokens(rng, 2, 25)
  logits, _ = jit_forward(model, tokens)
  prefill_logits, _, cache = jit_forward(model, tokens[:, :prompt_len], return_cache=True)
  np.testing.assert_allclose(np.asarray(prefill_logits), np.asarray(logits[:, :prompt_len]),
                             atol=1e-5)
  decoded, _ = decode_all(model, tokens, cache, start=prompt_len)
  err = float(jnp.abs(decoded - logits[:, prompt_len:]).max())
  assert err < 1e-4, f"prefill {prompt_len} then decode: max abs error {err:.2e}"


def test_cache_size_does_not_grow(rng):
  model = build(tiny_config(sal__window=4))
  model.eval()
  cache = model.init_cache(1)
  size = lambda c: sum(x.nbytes for x in jax.tree.leaves(c))
  before = size(cache)
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, token, cache: nnx.merge(graphdef, state).step(token, cache))
  for t in range(12):
    _, cache = step(state, jnp.array([t], jnp.int32), cache)
  assert size(cache) == before


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_decode_weights_prepared_once_change_no_result(rng, dtype):
  """inference.weights.prepare_decode_weights (the copy Generator prefills and decodes with)
  gives the same logits bit for bit, from the decode step and from the parallel forward,
  stores the Linear / Embed weights in the compute dtype and each Mamba-2 in_proj
  transposed for the decode kernel."""
  from taipan_jax.inference.weights import prepare_decode_weights
  model = build(tiny_config(model__dtype=dtype))
  model.eval()
  graphdef, state = nnx.split(model)
  cache = model.init_cache(2)
  tokens = jnp.asarray(rng.integers(0, model.vocab_size, 2), jnp.int32)
  plain = jax.jit(lambda s: nnx.merge(graphdef, s).step(tokens, cache)[0])(state)
  prepared = jax.jit(
      lambda s: prepare_decode_weights(nnx.merge(graphdef, s)).step(tokens, cache)[0])
  np.testing.assert_array_equal(np.asarray(prepared(state)), np.asarray(plain))
  merged = prepare_decode_weights(nnx.merge(graphdef, state))
  prompt = jnp.asarray(rng.integers(0, model.vocab_size, (2, 24)), jnp.int32)
  forward = lambda g, s: jax.jit(lambda s: nnx.merge(g, s)(prompt)[0])(s)
  np.testing.assert_array_equal(np.asarray(forward(*nnx.split(merged))),
                                np.asarray(forward(graphdef, state)))
  assert merged.embed.embedding[...].dtype == jnp.dtype(dtype)
  mixer = merged.layers[0].mixer
  assert mixer.in_proj.kernel[...].dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(mixer.in_proj_t[...]),
                                np.asarray(mixer.in_proj.kernel[...]).T)
  assert merged.layers[0].mixer.conv_weight[...].dtype == jnp.float32     # used in fp32
