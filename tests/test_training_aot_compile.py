"""`taipan compile`: the real train step compiled for a TPU slice on this CPU machine."""
import json

import pytest

from taipan_jax.sharding.topology import libtpu_available

pytestmark = [
    pytest.mark.tpu_compile,
    pytest.mark.skipif(not libtpu_available(), reason="libtpu not installed: `pip install -e "
                       "'.[test]'` on Linux x86_64 (or '.[tpu]') brings it and these run")]

KEYS = ("topology", "num_devices", "fits", "memory_per_device_bytes", "hbm_bytes",
        "mosaic_kernels", "flops", "bytes_accessed", "compile_seconds")
KERNELS = ("--config.mamba.kernel=pallas", "--config.sal.kernel=pallas",
           "--config.mamba.chunk_size=128")    # the Mosaic SSD kernel tiles chunks of 128
XLA = ("--config.mamba.kernel=xla", "--config.sal.kernel=xla")


def _compile(capsys, tmp_path, *flags):
  from taipan_jax import cli
  out = tmp_path / "report.json"
  try:
    cli.main(["taipan", "compile", "--config=tiny", "--topology=v5e:2x2", f"--out={out}",
              *flags])
    code = 0
  except SystemExit as e:
    code = e.code or 0
  captured = capsys.readouterr()
  report = json.loads(out.read_text()) if out.exists() else None
  return code, captured.out, captured.err, report


@pytest.mark.parametrize("kernels", [False, True], ids=["xla", "mosaic"])
def test_tiny_train_step_compiles_for_v5e_and_fits(capsys, tmp_path, kernels):
  code, out, err, report = _compile(capsys, tmp_path, *(KERNELS if kernels else XLA))
  assert code == 0, err
  assert all(k in report for k in KEYS)
  assert report["topology"] == "v5e:2x2" and report["num_devices"] == 4
  assert report["fits"] and 0 < report["memory_per_device_bytes"] < report["hbm_bytes"]
  assert report["flops"] > 0 and report["bytes_accessed"] > 0
  # tiny: 4 Mamba-2 blocks (SSD forward + 3 backward kernels) and 2 SALs (forward, dq, dk/dv)
  assert report["mosaic_kernels"] == (4 * 4 + 2 * 3 if kernels else 0)
  assert (report["flops_in_kernels_analytic"] > 0) == kernels
  assert report["collectives"].get("all-reduce", 0) > 0       # data-parallel gradients
  assert "fits" in out and "predicted step" in out


def test_a_step_over_the_chips_memory_exits_with_one_line(capsys, tmp_path):
  # A 20M-token vocabulary: 4.8 GiB of fp32 embedding, 14.3 GiB of state per device with
  # the Adam moments; XLA:TPU refuses the 28.6 GiB of temporaries on a 15.75 GiB v5e chip.
  code, out, err, report = _compile(capsys, tmp_path, "--config.model.vocab_size=20000000",
                                    "--config.train.batch_size=8", *XLA)
  assert code == 1 and not report["fits"]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("taipan: error: the train step needs")
  assert "GiB over the chip's 15.75 GiB HBM" in lines[0]
  for lever in ("mesh.fsdp", "train.batch_size", "grad_accum_steps", "rematerialisation"):
    assert lever in lines[0]


def test_a_topology_libtpu_cannot_describe_is_refused(capsys, tmp_path):
  code, _, err, report = _compile(capsys, tmp_path, "--topology=v5e:4x4x4")
  assert code == 2 and report is None
  assert "v5e topologies have 2 axes" in err


def test_a_long_context_segment_compiles_over_a_sequence_mesh(capsys, tmp_path):
  code, out, err, report = _compile(capsys, tmp_path, "--step=long_context",
                                    "--segment_len=256")
  assert code == 0, err
  assert report["mesh"] == {"sequence": 4} and report["tokens_per_step"] == 256
  # halos to the next chip (convolution inputs, attention keys); the SSD's states gathered
  assert report["collectives"].get("collective-permute", 0) > 0
  assert report["collectives"].get("all-gather", 0) > 0
  assert report["fits"]
