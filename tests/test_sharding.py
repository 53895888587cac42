"""Meshes and logical-axis sharding: the same training on every mesh, checkpoints that move
between meshes, and clear errors for meshes and rules that cannot work. 8 simulated CPU
devices (conftest)."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import taipan_jax
from taipan_jax import sharding
from taipan_jax.sharding.mesh import MeshError
from taipan_jax.sharding.rules import RulesError
from taipan_jax.training import partition
from taipan_jax.training.step import make_steps

from helpers import VOCAB, tiny_config

MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)]     # (data, fsdp, tensor)


def _mesh_overrides(data, fsdp, tensor):
  return {"mesh__data": data, "mesh__fsdp": fsdp, "mesh__tensor": tensor}


def _small(**overrides):
  # train.steps shapes the learning-rate schedule, a constant of the compiled step: with the
  # same 4 everywhere, the tests below compile each mesh's train step once between them (the
  # persistent compilation cache, conftest) instead of once per test.
  return tiny_config(**{"train__batch_size": 8, "data__seq_len": 16, "data__num_kv_pairs": 2,
                        "model__pattern": "ms", "model__num_units": 1, "train__steps": 4,
                        "optim__warmup_steps": 2, "train__eval_batches": 1, **overrides})


def test_mesh_shape_fills_and_rejects():
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2, sequence=1))
  assert sharding.mesh_shape(cfg, 8) == (2, 2, 2, 1)
  cfg.tensor = 3
  with pytest.raises(MeshError, match=r"leave 8 / 6 devices for mesh.data.*fix"):
    sharding.mesh_shape(cfg, 8)
  cfg.data = 2
  cfg.tensor = 1
  with pytest.raises(MeshError, match=r"make 4 devices but there are 8.*fix"):
    sharding.mesh_shape(cfg, 8)
  cfg.fsdp = -1
  cfg.data = -1
  with pytest.raises(MeshError, match="all -1"):
    sharding.mesh_shape(cfg, 8)


def test_rules_parse_and_name_bad_axes():
  assert sharding.parse_rules("batch=data+fsdp, embed=fsdp, norm=") == {
      "batch": ("data", "fsdp"), "embed": ("fsdp",), "norm": ()}
  with pytest.raises(RulesError, match="'embedding=fsdp'.*fix"):
    sharding.parse_rules("embedding=fsdp")
  with pytest.raises(RulesError, match=r"mesh axes \['model'\].*fix"):
    sharding.parse_rules("heads=model")
  with pytest.raises(taipan_jax.config.ConfigError, match="sharding.rules"):
    tiny_config(sharding__rules="heads=model")


@pytest.mark.parametrize("name", taipan_jax.config.bundled_configs())
def test_every_parameter_has_logical_axes(name):
  cfg = taipan_jax.load_config(name, {"model.vocab_size": 100})
  steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(0)))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=2, tensor=2, sequence=1)))
  shardings = sharding.tree_shardings(steps.abstract_state, mesh,
                                      sharding.parse_rules(cfg.sharding.rules))
  specs = [s.spec for s in jax.tree.leaves(shardings)]
  assert len(specs) == len(jax.tree.leaves(steps.abstract_state))
  assert any("fsdp" in str(s) for s in specs) and any("tensor" in str(s) for s in specs)


def _run_steps(cfg, devices, num_steps=2):
  """Losses, gradient norms and final parameters of num_steps training steps."""
  from taipan_jax.data import make_train_iterator
  steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=0,
                                                                              gumbel=1)))
  plan = partition.make_plan(cfg, steps.abstract_state, devices)
  state = partition.init_state(steps, plan)
  train_step = partition.jit_train_step(steps, plan)
  data = make_train_iterator(cfg)
  out = []
  for _ in range(num_steps):
    batch = jax.device_put(next(data), plan.batch)
    state, metrics = train_step(state, batch)
    out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  params = jax.tree.map(np.asarray, jax.device_get(state.params))
  return np.asarray(out), params, state


def test_training_is_the_same_on_every_mesh():
  """Loss and gradient norm of 2 steps, and the parameters after them, on one device and on
  4 meshes of 8 devices; the parameters really are split as the rules say."""
  expected, params_ref, _ = _run_steps(_small(mesh__data=1), jax.devices()[:1])
  for shape in MESHES:
    got, params, state = _run_steps(_small(**_mesh_overrides(*shape)), jax.devices())
    print(f"\nmesh {shape}: loss {got[:, 0]} vs {expected[:, 0]}")
    np.testing.assert_allclose(got, expected, rtol=2e-5, err_msg=str(shape))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=str(shape))
    embedding = state.params["embed"]["embedding"]
    want = [a for a, n in zip(("tensor", "fsdp"), (shape[2], shape[1])) if n > 1]
    assert [a for a in embedding.sharding.spec if a] == want, embedding.sharding.spec


def test_checkpoint_moves_between_meshes(tmp_path):
  """4 uninterrupted steps on mesh (2, 2, 2), checkpointed at step 2; resumed from that
  checkpoint on (1, 2, 4) to step 4: the same losses at steps 3 and 4."""
  import shutil
  from taipan_jax.training.loop import train
  common = dict(train__steps=4, train__log_every=1, train__eval_every=0,
                train__checkpoint_every=2)
  workdir = tmp_path / "run"
  straight = train(_small(**common, **_mesh_overrides(2, 2, 2)), str(workdir),
                   log=lambda *_: None)
  # Without step 4's checkpoint the next run starts from step 2's. (The first run goes on to
  # step 4 itself, rather than stopping at 2, so that it is the same compiled program as the
  # uninterrupted run, and as the other tests' (2, 2, 2) step.)
  shutil.rmtree(workdir / "checkpoints" / "4")
  lines = []
  resumed = train(_small(**common, **_mesh_overrides(1, 2, 4)), str(workdir),
                  log=lines.append)
  assert any("resumed from step 2" in line for line in lines), lines
  want = {r["step"]: r["loss"] for r in straight if "loss" in r}
  got = {r["step"]: r["loss"] for r in resumed if "loss" in r}
  assert set(got) == {3, 4}
  for step in got:
    np.testing.assert_allclose(got[step], want[step], rtol=2e-5)


def test_batch_that_does_not_split_is_refused():
  from taipan_jax.training.loop import TrainingError, train
  with pytest.raises(TrainingError, match=r"batch_size=6 does not split over the 4 batch "
                     r"shards.*fix: use a multiple of 4"):
    train(_small(train__batch_size=6, **_mesh_overrides(2, 2, 2)), None, log=lambda *_: None)


def test_two_processes_train_like_one(tmp_path):
  """`taipan train` as 2 processes x 4 CPU devices (jax.distributed, local coordinator, gloo
  collectives) gives the losses and held-out loss of one process on 8 devices."""
  import os
  import socket
  import subprocess
  import sys
  from taipan_jax.training.loop import train
  from trainer_helpers import SMALL, losses, metric_rows
  # One process on 8 devices: this one, with the config the processes get from their flags
  # (its compiled step is the other tests' mesh (8, 1, 1) step).
  single = train(_small(train__log_every=1, train__eval_every=0), None, log=lambda *_: None)
  args = ["train", "--config=tiny", *SMALL, "--config.train.steps=4",
          f"--config.model.vocab_size={VOCAB}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "taipan_jax.cli"]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  multi = str(tmp_path / "multi")
  procs = [subprocess.Popen(
      [*cmd, *args, f"--workdir={multi}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                          JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID=str(i))) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  assert "8 cpu device(s)" in outs[0][1] + outs[0][0]
  want = {r["step"]: r["loss"] for r in single if "loss" in r}
  got = losses(multi)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=2e-5)
  held_out = [r["eval/loss"] for r in metric_rows(multi) if "eval/loss" in r]
  assert len(held_out) == 1, held_out
  np.testing.assert_allclose(held_out, [r["eval/loss"] for r in single if "eval/loss" in r],
                             rtol=2e-5)


def test_memory_estimate_matches_the_state_and_grows_with_tokens():
  """The state part equals the bytes device 0 really holds after sharded init (mesh
  (2, 2, 2)); XLA's temporaries grow with the batch."""
  from taipan_jax.training.memory import estimate_training_memory
  estimates = []
  for batch in (8, 16):
    cfg = _small(train__batch_size=batch, **_mesh_overrides(2, 2, 2))
    steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(0)))
    plan = partition.make_plan(cfg, steps.abstract_state)
    estimates.append(estimate_training_memory(cfg, steps, plan))
  state = partition.init_state(steps, plan)
  device = jax.devices()[0]
  held = lambda tree: sum(s.data.nbytes for x in jax.tree.leaves(tree)
                          for s in x.addressable_shards if s.device == device)
  small, large = estimates
  assert large.params == held(state.params)
  assert large.params + large.optimizer == held(state)
  assert large.tokens_per_device == 2 * small.tokens_per_device == 16 * 16 // 4
  assert large.step_temporaries > small.step_temporaries > 0
