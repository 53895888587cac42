"""The `taipan` command line explains itself: help without jax, flag forms, flagfiles."""
import subprocess
import sys

from absl import flags, logging

from taipan_jax import cli

_HELP_PROBE = r"""
import sys
from taipan_jax import cli
for args in ([], ["--help"], ["-h"], ["help"], ["train", "--help"], ["eval", "-h"],
             ["help", "generate"], ["tokenizer", "train", "--help"]):
  try:
    cli.main(["taipan", *args])
    code = None
  except SystemExit as e:
    code = e.code
  print(f"@@ {args} rc={code} jax={'jax' in sys.modules}", flush=True)
"""


def test_help_lists_commands_and_flags_without_importing_jax():
  out = subprocess.run([sys.executable, "-c", _HELP_PROBE], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  results = [l for l in out.stdout.splitlines() if l.startswith("@@")]
  assert len(results) == 8 and all("rc=0 jax=False" in r for r in results), results
  overview, train_help = out.stdout.split("@@")[0], out.stdout.split("@@")[4]
  for name in ("train", "eval", "generate", "tokenizer", "convert"):
    assert f"  {name} " in overview
  assert "--workdir" in train_help and "--profile_steps" in train_help
  assert "--prompt" not in train_help and "examples:" in train_help


def test_flagfile_and_space_separated_values(tmp_path):
  flagfile = tmp_path / "run.flags"
  flagfile.write_text("--config.train.steps=30\n--config.model.d_model 96\n--workdir=/w/a\n")
  flags.FLAGS.unparse_flags()
  try:
    cli._parse("train", "taipan train", [f"--flagfile={flagfile}", "--config.optim.peak_lr",
                                         "0.01", "--config", "tiny", "-v", "1"])
    assert cli._overrides == ["--config.train.steps=30", "--config.model.d_model=96",
                              "--config.optim.peak_lr=0.01"]
    assert flags.FLAGS.workdir == "/w/a" and flags.FLAGS.config == "tiny"
    cli._set_verbosity()
    assert logging.get_verbosity() == 1                        # -v 1 is honoured
  finally:
    flags.FLAGS.unparse_flags()
    logging.set_verbosity(logging.WARNING)
