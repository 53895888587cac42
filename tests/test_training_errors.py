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
  # Someone else's directory: taipan must not touch a byte of it.
  (root / "foreign").mkdir(exist_ok=True)
  (root / "foreign" / "config.json").write_text('{"theirs": true}\n')
  (root / "foreign" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
  (root / "foreign" / "notes.txt").write_text("my notes\n")
  (root / "latin1").mkdir(exist_ok=True)
  (root / "latin1" / "a.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  (root / "binary").mkdir(exist_ok=True)
  (root / "binary" / "b.txt").write_bytes(bytes(range(256)) * 4)
  (root / "broken_config.py").write_text("def get_config(:\n  return None\n")
  (root / "raising_config.py").write_text(
      "from taipan_jax.configs import base\n\ndef get_config():\n  cfg = base.get_config()\n"
      "  cfg.train.steps = 10 // 0\n  return cfg\n")
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
    # issue 31's table, and further bad inputs found with it
    "workdir: someone else's directory": lambda r: [
        "train", f"--workdir={r / 'foreign'}", *SMALL],
    "workdir: a remote URL": lambda r: ["train", "--workdir=gs://bucket/run", *SMALL],
    "eval: a remote URL": lambda r: ["eval", "--workdir=gs://bucket/run"],
    "train without --workdir": lambda r: ["train"],
    "tokenizer train onto an existing output": lambda r: [
        "tokenizer", "train", f"--input={r / 'corpus'}", "--vocab_size=300",
        f"--output={r / 'spm'}"],
    "latin-1 text": lambda r: ["train", *_text(r, **{"data.path": str(r / "latin1")})],
    "binary file in the corpus": lambda r: [
        "train", *_text(r, **{"data.path": str(r / "binary")})],
    "binary file as tokenizer input": lambda r: [
        "tokenizer", "train", f"--input={r / 'binary'}", "--vocab_size=300",
        f"--output={r / 'fresh'}"],
    "eval --data on an MQAR run": lambda r: [
        "eval", f"--workdir={r / 'trained'}", f"--data={r / 'corpus'}"],
    "train --prompt (a flag of generate)": lambda r: ["train", "--prompt=hi"],
    "generate with a recipe override": lambda r: [
        "generate", f"--workdir={r / 'trained'}", "--prompt_ids=1,2",
        "--config.optim.peak_lr=0.1"],
    "config file with a syntax error": lambda r: [
        "train", f"--config={r / 'broken_config.py'}"],
    "config file that raises": lambda r: ["train", f"--config={r / 'raising_config.py'}"],
    "misspelt config key": lambda r: ["train", "--config.train.stpes", "30"],
    "misspelt config section": lambda r: ["train", "--config.trian.steps=30"],
    "override without a value": lambda r: ["train", "--config.train.steps"],
    "misspelt flag": lambda r: ["eval", f"--workdir={r / 'trained'}", "--eval_batchs=2"],
    "flagfile that does not exist": lambda r: ["train", f"--flagfile={r / 'none.flags'}"],
    "misspelt command": lambda r: ["trian"],
    "tokenizer without its verb": lambda r: ["tokenizer", f"--input={r / 'corpus'}"],
    "bad --profile_steps": lambda r: ["train", "--profile_steps=5"],
}


def _snapshot(root):
  """Every file under root with its bytes and mtime: nothing may be written or changed."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[path] = (fh.read(), os.stat(path).st_mtime_ns)
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
  assert not os.path.exists("gs:"), "a remote workdir was written as a local path"


def _with_workdir(args, tmp_path):
  """train runs get a fresh workdir unless the case names its own (or is about its lack)."""
  if args == ["train"]:
    return args
  if args and args[0] == "train" and not any(a.startswith("--workdir") for a in args):
    return [*args, f"--workdir={tmp_path / 'w'}"]
  return args


@pytest.mark.parametrize("name,fragment", [
    ("workdir: someone else's directory", "not a taipan run (config.json, metrics.jsonl"),
    ("workdir: a remote URL", "mount the bucket"),
    ("tokenizer train onto an existing output", "--overwrite"),
    ("latin-1 text", "a.txt is not UTF-8 at byte 3"),
    ("binary file in the corpus", "b.txt holds a NUL byte at byte 0"),
    ("binary file as tokenizer input", "binary file"),
    ("eval --data on an MQAR run", "'mqar' task, which reads no files"),
    ("train --prompt (a flag of generate)", "--prompt is a flag of `taipan generate`"),
    ("config file with a syntax error", "broken_config.py' line 1: SyntaxError"),
    ("config file that raises", "raising_config.py' line 5: get_config() raised "
                                "ZeroDivisionError"),
    ("misspelt config key", "did you mean train.steps?"),
    ("misspelt config section", "did you mean train.steps?"),
    ("misspelt flag", "did you mean --eval_batches?"),
    ("misspelt command", "did you mean `taipan train`?"),
])
def test_bad_input_message_names_the_problem(text_setup, taipan, name, fragment, tmp_path):
  out = taipan(*_with_workdir(CASES[name](text_setup), tmp_path))
  assert fragment in out.stderr, out.stderr[-2000:]
