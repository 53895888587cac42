"""The loop's guards and outputs: non-finite steps, TensorBoard, eval; the text sources."""
import json

import numpy as np
import pytest

import taipan_jax
from taipan_jax.data import pipeline
from taipan_jax.data.text import TextDocuments
from taipan_jax.data.tokenizer import load_tokenizer, train_tokenizer
from taipan_jax.training import loop
from taipan_jax.training.loop import TrainingError, train


def _small_cfg(**extra):
  overrides = {"model.pattern": "ms", "model.num_units": 1, "data.seq_len": 16,
               "data.num_kv_pairs": 2, "train.batch_size": 8, "train.log_every": 1,
               "train.eval_every": 0, "train.eval_batches": 1, "optim.warmup_steps": 2,
               **extra}
  return taipan_jax.load_config("tiny", overrides)


class _Poisoned:
  """Wraps the training iterator: batches whose 1-based number is in `bad` carry a NaN."""

  def __init__(self, inner, bad):
    self.inner, self.bad, self.count = inner, bad, 0

  def __next__(self):
    batch = dict(next(self.inner))
    self.count += 1
    if self.count in self.bad:
      batch["loss_mask"] = batch["loss_mask"].copy()
      batch["loss_mask"][0, -1] = np.nan
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _poison(monkeypatch, bad):
  make = pipeline.make_train_iterator
  monkeypatch.setattr(loop.pipeline, "make_train_iterator",
                      lambda *a, **k: _Poisoned(make(*a, **k), bad))


def test_nan_batch_is_skipped_and_counted(monkeypatch, tmp_path):
  _poison(monkeypatch, bad={3})
  lines = []
  history = train(_small_cfg(**{"train.steps": 6}), str(tmp_path), log=lines.append)
  rows = {r["step"]: r for r in history if "loss" in r}
  assert not np.isfinite(rows[3]["loss"]) and all(np.isfinite(rows[s]["loss"])
                                                   for s in (1, 2, 4, 5, 6))
  assert any("step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in all)" in l
             for l in lines), lines
  # The checkpoint holds finite parameters, and the run went on to the end.
  assert (tmp_path / "checkpoints" / "6").is_dir()


def test_nonfinite_steps_in_a_row_stop_the_run(monkeypatch, tmp_path):
  _poison(monkeypatch, bad=set(range(3, 100)))
  with pytest.raises(TrainingError, match="3 non-finite steps in a row at step 5"):
    train(_small_cfg(**{"train.steps": 20, "train.max_nonfinite_steps": 3,
                        "train.checkpoint_every": 2}), str(tmp_path), log=print)
  # Skipped steps leave the parameters as they were: step 4's checkpoint holds step 2's.
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]


def test_a_nonfinite_state_is_never_checkpointed(tmp_path):
  import jax.numpy as jnp
  from flax import nnx
  from taipan_jax.training.checkpoint import Checkpointer
  from taipan_jax.training.step import make_steps
  cfg = _small_cfg()
  state = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))).init_state()
  leaves, treedef = __import__("jax").tree.flatten(state.params)
  leaves[0] = leaves[0].at[0].set(jnp.nan)
  bad = state._replace(params=treedef.unflatten(leaves), step=jnp.int32(7))
  lines = []
  ckpt = Checkpointer(str(tmp_path), keep=2, log=lines.append)
  assert not ckpt.save(bad, data_state={}, cfg=cfg)
  ckpt.close()
  assert lines == ["not checkpointing step 7: the parameters hold non-finite values"]
  assert not (tmp_path / "checkpoints" / "7").exists()


def test_tensorboard_and_jsonl_hold_the_named_scalars(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  train(_small_cfg(**{"train.steps": 4, "train.eval_every": 2}), str(tmp_path), log=print)
  acc = EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  for name in ("loss", "ce", "budget_loss", "accuracy", "grad_norm", "lr", "selected_sal0",
               "tokens_per_second", "step_seconds", "eval/loss", "eval/perplexity",
               "eval/accuracy"):
    assert name in tags, (name, tags)
  assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
  assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  np.testing.assert_allclose([e.value for e in acc.Scalars("loss")], losses, rtol=1e-6)


def test_eval_command_reports_the_checkpoint(tmp_path):
  train(_small_cfg(**{"train.steps": 2}), str(tmp_path), log=print)
  lines = []
  row = loop.evaluate_workdir(str(tmp_path), log=lines.append)
  assert row["step"] == 2 and 0 <= row["eval/accuracy"] <= 1 and row["eval/perplexity"] > 1
  assert lines[0].startswith("step 2: eval/loss")


def test_text_sources_files_jsonl_array_record_and_globs(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  (tmp_path / "a.txt").write_text("plain one")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_text("plain two")
  (tmp_path / "sub" / "skip.md").write_text("not a corpus suffix")
  (tmp_path / "c.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two"}\n')
  writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  for text in ("record one", "record two", "record three"):
    writer.write(text.encode())
  writer.close()
  docs = TextDocuments(str(tmp_path))
  assert sorted(docs[i] for i in range(len(docs))) == sorted(
      ["plain one", "plain two", "json one", "json two", "record one", "record two",
       "record three"])
  assert [TextDocuments(str(tmp_path / "**/*.md"))[0]] == ["not a corpus suffix"]
  assert len(TextDocuments(str(tmp_path / "c.jsonl"))) == 2


def test_tokenizer_round_trip_with_byte_fallback(tmp_path):
  docs = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)]
  path = train_tokenizer(docs, str(tmp_path / "spm"), vocab_size=300, model_type="unigram")
  sp = load_tokenizer(path)
  assert sp.GetPieceSize() == 300
  text = "the lazy dog — ünïcödé 🐍"        # characters never seen: bytes
  assert sp.DecodeIds(sp.EncodeAsIds(text)) == text
