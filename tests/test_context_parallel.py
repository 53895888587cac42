"""Context parallelism: a sequence split over 8 simulated CPU devices gives the logits of
the one-device forward, for Taipan, Mamba-2 and the SWA-only hybrid."""
import jax
import numpy as np
import pytest

from taipan_jax import ops
from taipan_jax.sharding.context_parallel import context_parallel_forward

from helpers import build, jit_forward, randomize_gates, random_tokens, ssd_inputs, tiny_config

# 8 devices; 8 x 70 + 3 tokens: not a multiple of 8, nor of 8 x chunk (16); every device holds
# more than the SAL's window - 1 = 63 halo.
SEQ = 8 * 70 + 3

MODELS = {
    "taipan": {},
    "mamba2": {"model__pattern": "m"},
    "swa_hybrid": {"sal__selection": "all"},
}


@pytest.mark.parametrize("name", MODELS)
def test_context_parallel_forward_equals_one_device(rng, name):
  model = build(tiny_config(**MODELS[name]))
  randomize_gates(model, rng)
  model.eval()
  tokens = random_tokens(rng, 2, SEQ)
  want = np.asarray(jit_forward(model, tokens)[0])
  got = np.asarray(context_parallel_forward(model, tokens))
  assert got.shape == want.shape
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f"\n{name}: context-parallel over {jax.device_count()} devices vs one: {err:.1e}")
  assert err < 2e-5


def test_ssd_state_passing_with_initial_state_and_final_state(rng):
  """ops.ssd under sequence_parallel: the output and the final state of the last device
  equal one-device ops.ssd, with an initial state."""
  from jax.sharding import Mesh, PartitionSpec as P
  x, dt, A, B, C, init = ssd_inputs(rng, 2, 8 * 12, 4, 8, 2, 8)
  y_ref, final_ref = ops.ssd(x, dt, A, B, C, chunk_size=8, initial_state=init,
                             return_final_state=True)
  mesh = Mesh(np.asarray(jax.devices()), ("sequence",))

  def shard(x, dt, B, C):
    with ops.sequence_parallel("sequence"):
      y, final = ops.ssd(x, dt, A, B, C, chunk_size=8, initial_state=init,
                         return_final_state=True)
    return y, final[None]

  y, finals = jax.jit(jax.shard_map(
      shard, mesh=mesh, in_specs=(P(None, "sequence"),) * 4,
      out_specs=(P(None, "sequence"), P("sequence")), check_vma=False))(x, dt, B, C)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(finals[-1]), np.asarray(final_ref), rtol=1e-4,
                             atol=1e-5)


def test_context_parallel_refuses_what_it_cannot_split(rng):
  model = build(tiny_config())
  with pytest.raises(ValueError, match="model.eval"):
    context_parallel_forward(model, random_tokens(rng, 1, SEQ))
  model.eval()
  with pytest.raises(ValueError, match="halo of 63.*fix"):
    context_parallel_forward(model, random_tokens(rng, 1, 8 * 20))
  attention = build(tiny_config(model__pattern="ma"))
  attention.eval()
  with pytest.raises(ValueError, match="full attention"):
    context_parallel_forward(attention, random_tokens(rng, 1, SEQ))
