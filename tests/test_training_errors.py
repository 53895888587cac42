"""Bad inputs stop with one clear line and a non-zero exit, before anything is written.

Each case runs the `taipan` command's own entry point, in-process (every case fails before
any compilation, so this is fast). `pytest -s -q tests/test_training_errors.py` prints the
table of inputs and messages.
"""
import os
import sys

import pytest

from taipan_jax import cli
from trainer_helpers import SMALL


class _Result:
  def __init__(self, code, stdout, stderr):
    self.returncode, self.stdout, self.stderr = code, stdout, stderr


@pytest.fixture
def taipan(capsys):
  def run(*args):
    capsys.readouterr()
    try:
      cli.main(["taipan", *args])
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)
  return run


@pytest.fixture
def text_setup(tmp_path_factory, taipan):
  root = tmp_path_factory.getbasetemp() / "bad_inputs"
  if (root / "trained" / "checkpoints").exists():
    return root
  root.mkdir(exist_ok=True)
  corpus = root / "corpus"
  corpus.mkdir(exist_ok=True)
  for i in range(20):
    (corpus / f"d{i}.txt").write_text(f"document {i} " + "lorem ipsum dolor sit amet " * 20)
  (root / "empty").mkdir(exist_ok=True)
  (root / "empty" / "a.txt").write_text("")
  (root / "records.jsonl").write_text('{"body": "no text field here"}\n' * 30)
  tok = taipan("tokenizer", "train", f"--input={corpus}", "--vocab_size=300",
               f"--output={root / 'spm'}")
  assert tok.returncode == 0, tok.stderr[-2000:]
  trained = root / "trained"
  run = taipan("train", f"--workdir={trained}", *SMALL, "--config.train.steps=2")
  assert run.returncode == 0, run.stderr[-2000:]
  return root


def _text(root, **kw):
  args = {"data.task": "text", "data.path": str(root / "corpus"),
          "data.tokenizer": str(root / "spm.model"), "model.vocab_size": "300",
          "data.seq_len": "32", **kw}
  return [f"--config.{k}={v}" for k, v in args.items()]


CASES = {
    "unknown command": lambda r: ["trian"],
    "config file missing": lambda r: ["train", "--config=/no/such/config.py"],
    "unknown config key": lambda r: ["train", "--config.model.d_modle=64"],
    "value of the wrong type": lambda r: ["train", "--config.sal.window=wide"],
    "negative learning rate": lambda r: ["train", "--config.optim.peak_lr=-0.001"],
    "batch not a multiple of grad_accum_steps": lambda r: [
        "train", "--config.train.batch_size=8", "--config.train.grad_accum_steps=3"],
    "batch not a multiple of the device count": lambda r: [
        "train", "--config.train.batch_size=12"],
    "sequence too short for the task": lambda r: [
        "train", "--config.data.seq_len=10", "--config.data.num_kv_pairs=4"],
    "missing data path": lambda r: ["train", *_text(r, **{"data.path": str(r / "nope/*.txt")})],
    "empty corpus": lambda r: ["train", *_text(r, **{"data.path": str(r / "empty")})],
    "jsonl without the text field": lambda r: [
        "train", *_text(r, **{"data.path": str(r / "records.jsonl")})],
    "missing tokenizer file": lambda r: [
        "train", *_text(r, **{"data.tokenizer": str(r / "none.model")})],
    "tokenizer/model vocab mismatch": lambda r: [
        "train", *_text(r, **{"model.vocab_size": "512"})],
    "workdir not writable": lambda r: [
        "train", f"--workdir={r / 'corpus' / 'd0.txt' / 'run'}"],
    "workdir holds another model's checkpoint": lambda r: [
        "train", f"--workdir={r / 'trained'}", *SMALL, "--config.model.d_model=128"],
    "eval of a directory that is no workdir": lambda r: ["eval", f"--workdir={r / 'corpus'}"],
    "tokenizer vocab larger than the text allows": lambda r: [
        "tokenizer", "train", f"--input={r / 'corpus'}", "--vocab_size=50000",
        f"--output={r / 'big'}"],
}


def _snapshot(root):
  """Every file under root with its size and mtime: nothing may be written or changed."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      st = os.stat(os.path.join(dirpath, f))
      out[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_line(text_setup, taipan, name, tmp_path):
  before = _snapshot(text_setup)
  out = taipan(*_with_workdir(CASES[name](text_setup), tmp_path))
  errors = [l for l in out.stderr.splitlines() if l.startswith("taipan: error: ")]
  sys.__stdout__.write(f"\n| {name} | `{errors[0] if errors else out.stderr[-300:]}` |")
  assert out.returncode != 0
  assert len(errors) == 1, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "fix:" in errors[0] or "usage:" in errors[0], errors[0]
  assert _snapshot(text_setup) == before, "a failed run wrote or changed files"
  assert not (tmp_path / "w").exists(), "a failed run created its workdir"


def _with_workdir(args, tmp_path):
  """train runs get a fresh workdir unless the case names its own."""
  if args and args[0] == "train" and not any(a.startswith("--workdir") for a in args):
    return [*args, f"--workdir={tmp_path / 'w'}"]
  return args
