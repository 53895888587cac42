"""benchmarks/train_profile.py: its scoped ops carry their part into the compiled HLO's op_names
(forward and backward), and the parts are read back from them."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import taipan_jax
from taipan_jax.training.step import make_steps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import train_profile  # noqa: E402


def test_every_scoped_part_reaches_the_compiled_step(monkeypatch):
  import taipan_jax.models.lm as lm
  import taipan_jax.training.step as step
  from taipan_jax import ops
  for module, name in ((ops, "ssd"), (ops, "selective_window_attention"),
                       (ops, "linear_cross_entropy"), (step, "_token_sums"),
                       (lm.LanguageModel, "cross_entropy_sums"), (lm.LanguageModel, "logits")):
    monkeypatch.setattr(module, name, getattr(module, name))     # undone after the test
  train_profile.scoped_ops()
  cfg = taipan_jax.load_config("tiny", {"model.pattern": "ms", "model.num_units": 1,
                                        "train.batch_size": 2, "data.seq_len": 32})
  steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(0)))
  state = jax.jit(steps.init_state)()
  batch = train_profile.random_batch(cfg, 0)
  hlo = jax.jit(steps.train_step).lower(state, batch).compile().as_text()
  names = train_profile.hlo_op_names(hlo)
  parts = {train_profile.categorise(n, "") for n in names.values()}
  assert {"ssd", "attention", "head+loss", "matmuls", "optimizer", "other"} <= parts, parts
  backward = [n for n in names.values() if "transpose(" in n and "prof_ssd" in n]
  assert backward, "the SSD's backward lost its scope"
  assert train_profile.categorise("", "nvjet_hsh_128x256_gemm") == "matmuls"
  assert train_profile.categorise("jit(train_step)/while/body/add", "loop_fusion") == "other"
  np.testing.assert_equal(jnp.asarray(batch["targets"][:, :-1]), batch["tokens"][:, 1:])
