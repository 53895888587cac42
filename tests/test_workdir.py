"""Workdirs that never lose a user's files (issue 31): resume, moves, unreadable checkpoints,
a changed tokenizer, Ctrl-C, and a reader beside a saving trainer."""
import hashlib
import json
import os
import shutil
import signal
import time

import pytest

import taipan_jax
from taipan_jax import cli
from taipan_jax.training import loop, workdir as workdirs
from taipan_jax.training.checkpoint import CheckpointError
from taipan_jax.training.metrics import read_metrics
from trainer_helpers import SMALL, losses, start_taipan


def _snapshot(root):
  """{path: sha256 of its bytes} of every file under root."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _small(**extra):
  overrides = {"model.pattern": "ms", "model.num_units": 1, "data.seq_len": 16,
               "data.num_kv_pairs": 2, "train.batch_size": 8, "train.log_every": 1,
               "train.eval_every": 0, "train.eval_batches": 1, "optim.warmup_steps": 2,
               **extra}
  return taipan_jax.load_config("tiny", overrides)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A 3-step text run whose steps 2..3 were profiled, its tokenizer and its config."""
  from taipan_jax.data.tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp("text_run")
  (root / "corpus").mkdir()
  docs = [f"document {i} " + "alpha beta gamma delta " * (5 + i) for i in range(12)]
  for i, doc in enumerate(docs):
    (root / "corpus" / f"d{i}.txt").write_text(doc)
  spm = train_tokenizer(docs, str(root / "spm"), vocab_size=300)
  cfg = _small(**{"data.task": "text", "data.path": str(root / "corpus"),
                  "data.tokenizer": spm, "model.vocab_size": 300, "data.eval_fraction": 0.2,
                  "train.steps": 3, "train.checkpoint_every": 2})
  lines = []
  loop.train(cfg, str(root / "run"), log=lines.append, profile_steps=(2, 3))
  return root, cfg, lines


def test_a_run_owns_its_workdir_and_keeps_its_tokenizer(text_run):
  root, cfg, lines = text_run
  run = root / "run"
  marker = (run / workdirs.MARKER).read_text()
  assert '"project": "taipan-jax"' in marker and '"format": 1' in marker
  kept, digest = workdirs.kept_tokenizer(str(run))
  assert open(kept, "rb").read() == open(cfg.data.tokenizer, "rb").read()
  assert digest == hashlib.sha256(open(kept, "rb").read()).hexdigest()
  assert sorted(os.listdir(run / "configs")) == ["000_step0.json"]
  # the profile of steps 2..3: a trace TensorBoard's profile plugin reads
  traces = [os.path.join(d, f) for d, _, fs in os.walk(run / "profile") for f in fs]
  assert any(t.endswith(".xplane.pb") and os.path.getsize(t) > 0 for t in traces), traces
  assert any("profile of steps 2..3 written to" in l for l in lines)
  # the first step's line reports compilation, not a speed; the later ones a speed
  assert "first step (compiling)" in [l for l in lines if l.startswith("step       1/")][0]
  assert "tok/s" in [l for l in lines if l.startswith("step       3/")][0]


def test_a_moved_workdir_evaluates_with_its_own_tokenizer(text_run, tmp_path):
  root, cfg, _ = text_run
  moved = tmp_path / "moved"
  shutil.copytree(root / "run", moved)
  spm_copy = tmp_path / "spm.model"
  shutil.move(cfg.data.tokenizer, spm_copy)       # the tokenizer's original path is gone
  try:
    lines = []
    row = loop.evaluate_workdir(str(moved), log=lines.append)
  finally:
    shutil.move(spm_copy, cfg.data.tokenizer)
  assert row["step"] == 3 and row["eval/perplexity"] > 1
  # eval writes its results (JSON and TensorBoard) into the workdir it read
  assert (moved / "eval" / "held_out_step3.json").is_file()
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(moved / "eval" /
                                                                   "tb_held_out"))
  # eval --data evaluates that file: every document of it, not the run's held-out split
  one = root / "corpus" / "d5.txt"
  on_file = loop.evaluate_workdir(str(moved), data_path=str(one), log=lambda _: None)
  assert on_file["eval/loss"] != row["eval/loss"]
  assert (moved / "eval" / "d5.txt_step3.json").is_file()


def test_resume_keeps_every_config_and_appends_metrics(text_run, tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  root, cfg, _ = text_run
  run = tmp_path / "run"
  shutil.copytree(root / "run", run)
  # Resume from step 2 (steps 3 and 4 run again) in a workdir from before markers existed.
  shutil.rmtree(run / "checkpoints" / "3")
  os.remove(run / workdirs.MARKER)
  before = (run / "metrics.jsonl").read_bytes()
  changed = _small(**{"data.task": "text",
                      "data.path": cfg.data.path, "data.tokenizer": cfg.data.tokenizer,
                      "model.vocab_size": 300, "data.eval_fraction": 0.2,
                      "train.steps": 4, "optim.peak_lr": 1e-3})
  lines = []
  loop.train(changed, str(run), log=lines.append)
  diff = [l for l in lines if l.startswith("config changed since the last start")]
  assert len(diff) == 1 and "optim.peak_lr: 0.006 -> 0.001" in diff[0] \
      and "train.steps: 3 -> 4" in diff[0], lines
  assert sorted(os.listdir(run / "configs")) == ["000_step0.json", "001_step2.json"]
  assert (run / workdirs.MARKER).is_file()
  after = (run / "metrics.jsonl").read_bytes()
  assert after.startswith(before) and len(after) > len(before)   # appended, never rewritten
  rows = read_metrics(str(run))
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
  assert [r["loss"] for r in rows if r["step"] == 3 and "loss" in r] == \
      [r["loss"] for r in map(json.loads, after.decode().splitlines())
       if r["step"] == 3 and "loss" in r][-1:]          # the recomputed step 3 wins
  # TensorBoard drops the first run's points past the resumed step: one point a step.
  acc = EventAccumulator(str(run / "tensorboard"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
  # A model change is still refused, naming the field.
  with pytest.raises(CheckpointError, match=r"model.d_model: 64 -> 32"):
    loop.train(_small(**{"data.task": "text", "data.path": cfg.data.path,
                         "data.tokenizer": cfg.data.tokenizer, "model.vocab_size": 300,
                         "model.d_model": 32, "sal.head_dim": 16}), str(run), log=print)


def test_a_retrained_tokenizer_at_the_same_path_is_refused(text_run, tmp_path):
  from taipan_jax.data.tokenizer import train_tokenizer
  root, cfg, _ = text_run
  run = tmp_path / "run"
  shutil.copytree(root / "run", run)
  other = train_tokenizer([f"zeta eta iota kappa lambda mu nu xi omicron pi rho {i} " * 20
                           + "the quick brown fox jumps over the lazy dog" for i in range(40)],
                          str(tmp_path / "spm"), vocab_size=300)
  before = _snapshot(run)
  retrained = _small(**{"data.task": "text", "data.path": cfg.data.path,
                        "data.tokenizer": other, "model.vocab_size": 300, "train.steps": 4})
  with pytest.raises(workdirs.WorkdirError, match="not the tokenizer this workdir was trained"):
    loop.train(retrained, str(run), log=print)
  assert _snapshot(run) == before


def test_unreadable_checkpoints_stop_the_run_and_move_nothing(text_run, tmp_path, capsys):
  root, cfg, _ = text_run
  run = tmp_path / "run"
  shutil.copytree(root / "run", run)
  for step in os.listdir(run / "checkpoints"):    # truncate every array file of every step
    for dirpath, _, files in os.walk(run / "checkpoints" / step / "state"):
      for f in files:
        path = os.path.join(dirpath, f)
        with open(path, "r+b") as fh:
          fh.truncate(max(os.path.getsize(path) // 3, 1))
  before = _snapshot(run)
  code = None
  try:
    cli.main(["taipan", "train", f"--workdir={run}", "--config=" + str(run / "config.json")])
  except SystemExit as e:
    code = e.code
  err = capsys.readouterr().err
  errors = [l for l in err.splitlines() if l.startswith("taipan: error:")]
  assert code == 2 and len(errors) == 1, err[-3000:]
  assert "no checkpoint in" in errors[0] and "can be read" in errors[0]
  assert f"{run / 'checkpoints' / '3'}" in errors[0] and "nothing was moved" in errors[0]
  assert _snapshot(run) == before               # no quarantine, no restart, no new files
  # A read-only command says the same and moves nothing either.
  with pytest.raises(CheckpointError, match="can be read"):
    loop.evaluate_workdir(str(run), log=print)
  assert _snapshot(run) == before


def test_first_sigint_asks_to_stop_and_the_second_aborts():
  with loop._Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_eval_beside_a_saving_trainer(tmp_path):
  """A trainer saving every step (3 kept) while eval reads the same workdir over and over:
  both finish, and the trainer's checkpoints are all there and readable."""
  run = tmp_path / "run"
  proc = start_taipan("train", f"--workdir={run}", *SMALL, "--config.train.steps=40",
                      "--config.train.checkpoint_every=1")
  deadline = time.time() + 240
  steps = []
  while not steps:     # until the first checkpoint is finished, not merely begun
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
    try:
      steps.append(loop.evaluate_workdir(str(run), log=lambda _: None)["step"])
    except (CheckpointError, workdirs.WorkdirError):
      time.sleep(0.1)
  while proc.poll() is None:
    steps.append(loop.evaluate_workdir(str(run), log=lambda _: None)["step"])
  out, err = proc.communicate()
  assert proc.returncode == 0, err[-2000:]
  assert "done: 40 steps" in out
  assert len(steps) >= 2 and steps == sorted(steps), steps
  assert sorted(int(n) for n in os.listdir(run / "checkpoints")) == [38, 39, 40]
  assert not (run / "checkpoints_corrupt").exists()
  assert loop.evaluate_workdir(str(run), log=lambda _: None)["step"] == 40
  assert max(losses(run)) == 40
