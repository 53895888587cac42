"""Context parallelism: a sequence split over 8 simulated CPU devices gives the logits of
the one-device forward, for Taipan, Mamba-2 and the SWA-only hybrid."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taipan_jax import ops
from taipan_jax.sharding.context_parallel import context_parallel_forward

from helpers import build, jit_forward, randomize_gates, random_tokens, tiny_config
from kernel_inputs import ssd_inputs

# 8 devices; 8 x 70 + 3 tokens: not a multiple of 8, nor of 8 x chunk (16); every device holds
# more than the SAL's window - 1 = 63 halo.
SEQ = 8 * 70 + 3

MODELS = {
    "taipan": {},
    "mamba2": {"model__pattern": "m"},
    "swa_hybrid": {"sal__selection": "all"},
    "taipan_rope": {"sal__rope": True},        # positions must be the whole row's
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


def _packed_batch(rng, rows, length, vocab):
  """A text-like batch: each row packs documents as runs of ids 1, 2, ..., one run ending
  exactly where the second quarter of the row starts (a device edge at 4 devices), and a
  padded tail (id 0)."""
  seg = np.zeros((rows, length), np.int32)
  for r in range(rows):
    cuts = sorted({length // 4, *rng.integers(1, length - 8, size=3)})
    ids = np.searchsorted(np.asarray(cuts), np.arange(length), side="right") + 1
    seg[r] = np.where(np.arange(length) < length - 5, ids, 0)
  tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
  return {"tokens": tokens, "targets": rng.integers(0, vocab, (rows, length)).astype(np.int32),
          "loss_mask": (seg > 0).astype(np.float32), "segment_ids": seg}


def _train(cfg, devices, batches):
  from flax import nnx

  import taipan_jax
  from taipan_jax.training import partition
  from taipan_jax.training.step import make_steps
  steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=0,
                                                                              gumbel=1)))
  plan = partition.make_plan(cfg, steps.abstract_state, devices)
  state = partition.init_state(steps, plan)
  train_step = partition.jit_train_step(steps, plan)
  out = []
  for batch in batches:
    state, metrics = train_step(state, jax.device_put(batch, plan.batch))
    out.append([float(metrics[k]) for k in ("loss", "budget_loss", "grad_norm")]
               + list(np.asarray(metrics["selected"])))
  lowered = partition.lower_train_step(steps, plan, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=plan.batch), batches[0]))
  return (np.asarray(out), jax.tree.map(np.asarray, jax.device_get(state.params)),
          lowered.as_text())


def test_training_with_the_length_split_equals_one_device(rng):
  """Two training steps of Taipan on packed documents (Gumbel selection, budget loss) with
  mesh data 2 x sequence 4: the losses, gradient norms and parameters of one device."""
  length = 4 * 64             # each device's quarter holds the SAL's window - 1 = 63 halo
  # One Mamba-2 block and one SAL: every kind of halo (the convolution's, the SSM state's,
  # the window's) and the selection crosses the devices; more layers would only repeat them
  # and multiply the compile time of the two train steps (one device, the split mesh).
  common = dict(data__task="text", data__path="unused", data__tokenizer="unused",
                data__seq_len=length, train__batch_size=4, optim__warmup_steps=1,
                model__pattern="ms", model__num_units=1)
  batches = [_packed_batch(rng, 4, length, 100) for _ in range(2)]
  want, params_want, _ = _train(tiny_config(**common), jax.devices()[:1], batches)
  split = tiny_config(**common, mesh__data=2, mesh__sequence=4)
  got, params, program = _train(split, jax.devices(), batches)
  assert "collective_permute" in program        # the halos really cross devices
  print(f"\nloss, budget loss, grad norm, selected per SAL:\n{got}\none device:\n{want}")
  assert (got[:, 3:] > 0.05).all() and (got[:, 3:] < 0.95).all()   # a real mix is selected
  np.testing.assert_allclose(got, want, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_want)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(model__pattern="ma"), "full attention"),
    (dict(data__seq_len=4 * 64 + 2), "does not divide data.seq_len"),
    (dict(data__seq_len=4 * 40), "40 tokens of each row per device, fewer than the 63"),
    (dict(sal__inference_capacity=8), "sal.inference_capacity"),
])
def test_context_parallel_training_config_errors(overrides, message):
  from taipan_jax.config import ConfigError
  base = dict(data__seq_len=4 * 64, mesh__sequence=4, mesh__data=2)
  with pytest.raises(ConfigError, match=f"{message}.*fix"):
    tiny_config(**{**base, **overrides})


@pytest.mark.parametrize("overrides", [
    dict(sal__window=7),                                   # Taipan
    dict(sal__window=6, sal__kv_selected_only=True),
], ids=["taipan", "kv_selected_only"])
def test_streamed_evaluation_split_over_devices_equals_one_device(rng, overrides):
  """stream_nll with each 64-token segment split over 8 devices (8 tokens each, more than
  the window's halo) and the cache carried between segments: the NLL of one device. The
  last segment (21 tokens) is too short to split and runs on one device. (Taipan's Mamba-2
  layers cover the Mamba-2 cache.)"""
  from taipan_jax.inference.long_context import stream_nll
  model = build(tiny_config(**overrides))
  randomize_gates(model, rng)
  model.eval()
  tokens = np.asarray(random_tokens(rng, 1, 150)[0])
  want = stream_nll(model, tokens, segment_len=64, mesh=None, log=None)
  lines = []
  got = stream_nll(model, tokens, segment_len=64, log=lines.append)     # "auto": 8 devices
  assert "split over 8 devices" in lines[0]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_document_positions_across_devices(rng):
  """Positions within each packed document, on one device and with the row split over 8:
  a document that began on an earlier device keeps counting (the inference draw's key)."""
  from jax.sharding import Mesh, PartitionSpec as P
  seg = np.cumsum(rng.random((3, 64)) < 0.05, axis=1).astype(np.int32)
  seg[1] = 7                                     # one document over every device
  expected = np.zeros_like(seg)
  for r in range(3):
    for t in range(1, 64):
      expected[r, t] = expected[r, t - 1] + 1 if seg[r, t] == seg[r, t - 1] else 0
  np.testing.assert_array_equal(np.asarray(ops.document_positions(jnp.asarray(seg))),
                                expected)
  mesh = Mesh(np.asarray(jax.devices()), ("sequence",))

  def shard(s):
    with ops.sequence_parallel("sequence"):
      return ops.document_positions(s)

  split = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=P(None, "sequence"),
                                out_specs=P(None, "sequence"), check_vma=False))
  np.testing.assert_array_equal(np.asarray(split(jnp.asarray(seg))), expected)
