"""Preemption: kill -9 and resume bitwise, SIGTERM, corrupt checkpoints, exact data resume."""
import fcntl
import os
import shutil
import signal
import time

import numpy as np
import pytest

import taipan_jax
from taipan_jax.data import make_train_iterator
from trainer_helpers import SMALL, losses, start_taipan, taipan

STEPS = 24


def _wait_for_step(proc, workdir, step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if max(losses(workdir), default=0) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
    time.sleep(0.02)
  raise AssertionError("run too slow")


ARGS = SMALL + [f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The workdir of an uninterrupted run of ARGS (checkpoints at steps 15, 20 and 24 kept),
  made once per test session: the kill-and-resume test's reference and the corrupt-checkpoint
  test's first run. Under pytest-xdist the first worker that needs it trains it in the
  session's shared temporary directory and the other waits for it (a file lock)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent                    # popen-gw<N>/.. : shared by the workers
  workdir = root / "uninterrupted_run"
  done = root / "uninterrupted_run.done"
  with open(root / "uninterrupted_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)
      ref = taipan("train", f"--workdir={workdir}", *ARGS)
      assert ref.returncode == 0, ref.stderr[-2000:]
      done.touch()
  return workdir


def test_kill_and_resume_matches_an_uninterrupted_run_bitwise(tmp_path, uninterrupted):
  expected = losses(uninterrupted)
  assert sorted(expected) == list(range(1, STEPS + 1))

  work = tmp_path / "killed"
  proc = start_taipan("train", f"--workdir={work}", *ARGS)
  _wait_for_step(proc, work, 12)          # past the checkpoints of steps 5 and 10
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(losses(work))
  assert killed_at < STEPS, "the run finished before it was killed"
  resumed = taipan("train", f"--workdir={work}", *ARGS)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step" in resumed.stdout
  got = losses(work)
  assert sorted(got) == list(range(1, STEPS + 1))
  # Every step's loss, before and after the kill, equals the uninterrupted run's exactly.
  assert got == expected, {s: (got[s], expected[s]) for s in got if got[s] != expected[s]}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, sig):
  # SIGINT is Ctrl-C (and a notebook's interrupt): saved like a preemption, no traceback.
  args = SMALL + ["--config.train.steps=100000", "--config.train.checkpoint_every=0"]
  proc = start_taipan("train", f"--workdir={tmp_path}", *args)
  _wait_for_step(proc, tmp_path, 3)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "Traceback" not in err, err[-2000:]
  name = signal.Signals(sig).name
  assert f"{name} at step" in out
  step = int(out.split(f"{name} at step ")[1].split(":")[0])
  assert os.path.isdir(tmp_path / "checkpoints" / str(step))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, uninterrupted):
  # A copy of the uninterrupted run: checkpoints at steps 15, 20 and 24 (3 kept).
  work = tmp_path / "run"
  shutil.copytree(uninterrupted, work)
  # Damage every array file of the newest step.
  latest = work / "checkpoints" / str(STEPS)
  damaged = 0
  for root, _, files in os.walk(latest / "state"):
    for f in files:
      path = os.path.join(root, f)
      with open(path, "r+b") as fh:
        fh.truncate(max(os.path.getsize(path) // 3, 1))
      damaged += 1
  assert damaged
  again = taipan("train", f"--workdir={work}", *ARGS)
  assert again.returncode == 0, again.stderr[-2000:]
  lines = [l for l in again.stderr.splitlines()
           if f"checkpoint step {STEPS} is unreadable" in l]
  assert len(lines) == 1, again.stderr[-3000:]
  assert "resumed from step 20" in again.stdout
  assert os.listdir(work / "checkpoints_corrupt")
  # It trained the steps after the fallback again, to the end.
  assert f"done: {STEPS - 20} steps in" in again.stdout, again.stdout[-2000:]
  assert max(losses(work)) == STEPS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """30 small documents and a tokenizer trained on them."""
  from taipan_jax.data.tokenizer import train_tokenizer
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "theta", "kappa"]
  docs = []
  for i in range(30):
    n = int(rng.integers(5, 60))
    docs.append(f"doc{i} " + " ".join(rng.choice(words, n)))
    (root / f"d{i:02d}.txt").write_text(docs[-1])
  model = train_tokenizer(docs, str(root / "spm"), vocab_size=300)
  return root, model


def _text_cfg(corpus, **extra):
  root, model = corpus
  overrides = {"data.task": "text", "data.path": str(root), "data.tokenizer": model,
               "model.vocab_size": 300, "data.seq_len": 24, "train.batch_size": 4,
               "data.eval_fraction": 0.1, **extra}
  return taipan_jax.load_config("tiny", overrides)


@pytest.mark.parametrize("workers", [0, 2])
def test_data_resume_repeats_and_skips_nothing(corpus, workers):
  cfg = _text_cfg(corpus, **{"data.num_workers": workers})
  it = make_train_iterator(cfg)
  reference = []
  for i in range(40):                             # more than one epoch
    if i == 5:
      state = it.get_state()                      # after 5 batches, as a checkpoint takes it
    reference.append(next(it))
  del it
  resumed_it = make_train_iterator(cfg)
  resumed_it.set_state(state)
  resumed = [next(resumed_it) for _ in range(35)]
  for a, b in zip(reference[5:], resumed):
    for key in ("tokens", "targets", "example_ids", "segment_ids"):
      np.testing.assert_array_equal(a[key], b[key])
  # The example ids of the stream: every training document appears, no held-out one does.
  # In one process (workers=0) the stream is one packed sequence: each document is one
  # contiguous run per epoch, and the first epoch holds every training document once.
  # (Workers pack their own slices of the documents and their batches interleave.)
  from taipan_jax.data.text import split_indices
  train_docs, held_out = split_indices(30, 0.1)
  ids = np.concatenate([b["example_ids"].reshape(-1) for b in reference])
  assert set(ids.tolist()) == set(train_docs.tolist())
  if workers == 0:
    runs = ids[np.r_[True, ids[1:] != ids[:-1]]]
    assert runs.size > len(train_docs), "the reference stream should pass one epoch"
    assert sorted(runs[:len(train_docs)].tolist()) == sorted(train_docs.tolist())


def test_packed_batches_keep_documents_apart(corpus):
  cfg = _text_cfg(corpus)
  batch = next(make_train_iterator(cfg))
  seg, ids, mask = batch["segment_ids"], batch["example_ids"], batch["loss_mask"]
  tokens, targets = batch["tokens"], batch["targets"]
  assert tokens.shape == (4, 24) and tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
  for row in range(4):
    # A segment is one document, and a target counts only inside its own document.
    for s in np.unique(seg[row]):
      assert len(np.unique(ids[row][seg[row] == s])) == 1
    boundary = np.nonzero(seg[row][1:] != seg[row][:-1])[0]
    assert (mask[row][boundary] == 0).all()
