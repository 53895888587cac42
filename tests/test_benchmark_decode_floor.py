"""benchmarks/decode_floor.py: its phase list reads every weight of the model once, and its
streaming kernel sums what it should (interpret mode)."""
import os
import sys

import pytest

import taipan_jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import decode_floor  # noqa: E402


@pytest.mark.parametrize("name,phases", [("taipan_190m", 18 * 2 + 3 * 6 + 2),
                                         ("transformer_190m", 12 * 6 + 2),
                                         ("mamba2_190m", 24 * 2 + 2),
                                         ("jamba_190m", 18 * 2 + 3 * 6 + 2)])
def test_phases_read_the_models_weights(name, phases):
  """The floor is only a floor of this model if its phases move the model's bytes: the
  weights they read are its parameters in bf16, less the small vectors (norms, convolution,
  dt bias, A, D) they leave out in the model's favour."""
  cfg = taipan_jax.load_config(name)
  listed = decode_floor.decode_phases(cfg, context=4096)
  assert len(listed) == phases
  weight_bytes = sum(w for _, w, _ in listed)
  assert 0.995 < weight_bytes / (2 * taipan_jax.count_params(cfg)) <= 1.0


def test_attention_phase_grows_with_the_context():
  cfg = taipan_jax.load_config("transformer_190m")
  kv = lambda context: sum(o for p, _, o in decode_floor.decode_phases(cfg, context)
                           if p == "attention attention")
  # 12 layers, keys and values of 768 channels in bf16 per cached token
  assert kv(65536) == 12 * 2 * 65536 * 768 * 2
  assert kv(131072) == 2 * kv(65536)


def test_stream_kernel_matches_numpy():
  decode_floor.check_stream(interpret=True)      # raises on a wrong sum, for every shape
