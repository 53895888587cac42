"""The training entry point: optimizer details, the CLI, and the tiny Taipan learning MQAR."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import taipan_jax
from taipan_jax.data import mqar_batch
from taipan_jax.train import train, weight_decay_mask


def test_mqar_batch_layout():
  b = mqar_batch(jax.random.key(0), batch_size=4, seq_len=21, num_kv_pairs=3, vocab_size=20)
  tokens, targets, mask = (np.asarray(b[k]) for k in ("tokens", "targets", "loss_mask"))
  for row in range(4):
    keys, values = tokens[row, 0:6:2], tokens[row, 1:6:2]
    assert len(set(keys)) == 3 and (keys >= 1).all() and (keys < 10).all()
    assert (values >= 10).all() and (values < 20).all()
    pairs = dict(zip(keys, values))
    for t in np.nonzero(mask[row])[0]:
      assert t >= 6 and targets[row, t] == pairs[tokens[row, t]] == tokens[row, t + 1]
  assert mask.sum(-1).tolist() == [(21 - 6) // 2] * 4


def test_weight_decay_only_on_matrices():
  cfg = taipan_jax.load_config("tiny", {"model.pattern": "msa"})
  params = nnx.state(taipan_jax.build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  mask = weight_decay_mask(params)
  decayed = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(mask) if v}
  kept = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(mask)
          if not v}
  assert any("in_proj" in p for p in decayed) and any("q_proj" in p for p in decayed)
  for name in ("embed", "A_log", "dt_bias", "'D'", "norm", "bias"):
    assert any(name in p for p in kept), name
    assert not any(name in p for p in decayed), name


def test_cli_runs_with_overrides(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "-m", "taipan_jax.train", "--config.train.steps=3",
       "--config.train.log_every=1", "--config.train.batch_size=4"],
      capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "step      3/3" in out.stdout


def test_cli_rejects_bad_override():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "taipan_jax.train", "--config.sal.window=0"],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode != 0
  assert "config key sal.window=0" in out.stderr


def test_tiny_taipan_learns_mqar():
  # 4 pairs: a model without memory can at best guess among the 4 values it saw (0.25);
  # uniform guessing over the 16 values gives 0.0625.
  # The README's main job as configured (1000 steps); 0.57 on a 2-core CPU when written.
  cfg = taipan_jax.load_config("tiny", {"train.log_every": 1000})
  history = train(cfg, log=print)
  first, last = history[0], history[-1]
  print(f"MQAR: eval accuracy {first['eval_accuracy']:.3f} -> {last['eval_accuracy']:.3f}, "
        f"ce {first['ce']:.3f} -> {last['ce']:.3f}, {last['seconds']:.0f}s")
  assert first["eval_accuracy"] < 0.15
  assert last["eval_accuracy"] > 0.4, last
  assert last["ce"] < 0.75 * first["ce"]
  assert 0.3 < last["selected"] < 0.7          # the budget loss holds selection near C = 0.5
