"""The training loop and offline evaluation, around the jitted steps in `step.py`.

Periodic actions around `train_step`: progress lines, metrics (TensorBoard + JSON lines),
held-out evaluation, checkpoints. The run resumes from the newest readable checkpoint in
its workdir by itself, and SIGTERM (preemption) saves and returns.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

import taipan_jax
from taipan_jax.data import pipeline
from taipan_jax.training import flops, partition
from taipan_jax.training.checkpoint import Checkpointer, write_config
from taipan_jax.training.metrics import MetricsWriter, format_eta
from taipan_jax.training.step import make_steps


class TrainingError(RuntimeError):
  """The run cannot go on (the message says why and what to change)."""


def check_workdir(workdir: str) -> None:
  """The workdir must exist or be creatable, and be writable, before any work starts."""
  path = os.path.abspath(workdir)
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise TrainingError(f"workdir {workdir!r} is not writable ({parent} does not allow it); "
                        "fix: pick a --workdir you can write to")


class _Preemption:
  """Remembers a SIGTERM so the loop can checkpoint at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    # Signal handlers can be installed from the main thread only (tests call train() from
    # worker threads too).
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _plan(cfg, steps) -> partition.Plan:
  try:
    return partition.make_plan(cfg, steps.abstract_state)
  except partition.PartitionError as e:
    raise TrainingError(str(e)) from None


def _restore_target(state):
  """The abstract state (shapes, dtypes, shardings) a checkpoint is restored into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _global_batch(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def _host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _eval_metrics(eval_step, params, batches, sharding) -> dict:
  sums = None
  for batch in batches:
    out = _host(eval_step(params, _global_batch(batch, sharding)))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  if sums is None:
    return {}
  weight = max(float(sums["weight"]), 1.0)
  ce = float(sums["ce_sum"]) / weight
  row = {"eval/loss": ce, "eval/perplexity": float(np.exp(min(ce, 50.0))),
         "eval/accuracy": float(sums["correct"]) / weight}
  for i, frac in enumerate(np.atleast_1d(sums["selected"]) / len(batches)):
    row[f"eval/selected_sal{i}"] = float(frac)
  return row


def _log_row(metrics: dict) -> dict:
  row = {k: float(metrics[k]) for k in ("loss", "ce", "budget_loss", "accuracy", "grad_norm",
                                        "lr")}
  for i, frac in enumerate(np.atleast_1d(metrics["selected"])):
    row[f"selected_sal{i}"] = float(frac)
  return row


def selection_monitor(train_fractions, eval_fractions, bound: float) -> tuple[dict, str]:
  """Train-mode (Gumbel draw) against eval-mode (the inference rule) selected fraction per
  SAL, on the same batch: metric rows and, when a gap exceeds `bound`, a warning line.

  A gap means evaluation and decoding run a different model from the one trained (a rule
  that selects nothing switches the attention off)."""
  row, gaps = {}, []
  for i, (train, eval_) in enumerate(zip(np.atleast_1d(train_fractions),
                                         np.atleast_1d(eval_fractions))):
    row[f"selected_eval_rule_sal{i}"] = float(eval_)
    if abs(float(eval_) - float(train)) > bound:
      gaps.append(f"SAL {i} {float(train):.3f} in training, {float(eval_):.3f} at eval")
  warning = ("" if not gaps else
             "warning: selected fraction differs between training and inference beyond "
             f"train.selection_gap_warning={bound}: " + "; ".join(gaps)
             + "; check sal.inference_selection")
  return row, warning


def train(cfg: ml_collections.ConfigDict, workdir: str | None, *,
          log: Callable[[str], None] = print) -> list[dict]:
  """Trains a validated config; checkpoints and metrics go to `workdir` (None: neither).

  Returns the rows written to the metrics file (train rows every log_every steps, eval rows
  every eval_every steps).
  """
  t = cfg.train
  if workdir:
    check_workdir(workdir)
  # Data first: a bad path, an empty corpus or a tokenizer mismatch stops here, before any
  # compilation or any file is written.
  corpus = pipeline.load_corpus(cfg)
  data_iter = pipeline.make_train_iterator(cfg, process_index=jax.process_index(),
                                           process_count=jax.process_count(), corpus=corpus)
  eval_batches = pipeline.make_eval_batches(cfg, t.eval_batches, corpus=corpus,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())

  steps = make_steps(cfg, lambda: taipan_jax.build_model(
      cfg, rngs=nnx.Rngs(params=t.seed, gumbel=t.seed + 1)))
  plan = _plan(cfg, steps)
  state = partition.init_state(steps, plan)
  train_step = partition.jit_train_step(steps, plan)
  eval_step = partition.jit_eval_step(steps, plan)
  rows = plan.batch

  checkpointer = None
  start_step = 0
  is_main = jax.process_index() == 0
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints, log=log)
    restored = checkpointer.restore(_restore_target(state), cfg)
    if restored is not None:
      state, data_state, start_step = restored
      if data_state is not None:       # None: converted weights, no data read yet
        data_iter.set_state(data_state)
      log(f"resumed from step {start_step} in {checkpointer.directory}")
    if is_main:
      write_config(cfg, workdir)
  writer = MetricsWriter(workdir, enabled=bool(workdir) and is_main, resume_step=start_step)

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  tokens_per_step = t.batch_size * cfg.data.seq_len
  flops_per_token = flops.train_flops_per_token(cfg, cfg.data.seq_len)
  peak = flops.peak_flops_per_second(jax.devices()[0], cfg.model.dtype)
  log(f"{cfg.name}: {n_params:,} parameters, {cfg.model.pattern} x {cfg.model.num_units}, "
      f"task {cfg.data.task}, {t.batch_size} x {cfg.data.seq_len} tokens a step on "
      f"{jax.device_count()} {jax.devices()[0].platform} device(s), mesh "
      f"{dict(plan.mesh.shape)}, steps {start_step}"
      f"..{t.steps}, jax {jax.__version__}")

  history = []
  window_start, window_step = time.perf_counter(), start_step
  run_start = time.perf_counter()

  def emit(step, row):
    history.append({"step": step, **row})
    writer.write(step, row)

  def report(step, metrics, now, batch):
    nonlocal window_start, window_step
    seconds = now - window_start
    rate = (step - window_step) * tokens_per_step / max(seconds, 1e-9)
    row = _log_row(metrics)
    selected = np.atleast_1d(metrics["selected"])
    eval_selected, warning = None, ""
    if selected.size:     # the inference rule on this training batch, side by side
      eval_selected = np.atleast_1d(_host(eval_step(state.params, batch))["selected"])
      monitor_row, warning = selection_monitor(selected, eval_selected,
                                               t.selection_gap_warning)
      row.update(monitor_row)
    row.update(tokens_per_second=rate, step_seconds=seconds / max(step - window_step, 1))
    util = flops.mfu(rate / jax.device_count(), flops_per_token, peak)
    if util is not None:
      row["mfu"] = util
    emit(step, row)
    eta = row["step_seconds"] * (t.steps - step)
    log(f"step {step:7d}/{t.steps}  loss {row['loss']:.4f}  acc {row['accuracy']:.3f}  "
        + (f"selected {selected.mean():.3f} (eval rule {eval_selected.mean():.3f})  "
           if selected.size else "")
        + f"gnorm {row['grad_norm']:.3f}  {rate:,.0f} tok/s"
        + (f"  mfu {util:.1%}" if util is not None else "") + f"  eta {format_eta(eta)}")
    if warning:
      log(warning)
    window_start, window_step = time.perf_counter(), step

  def evaluate(step):
    row = _eval_metrics(eval_step, state.params, eval_batches, rows)
    if row:
      emit(step, row)
      log(f"eval at step {step}: loss {row['eval/loss']:.4f}  ppl "
          f"{row['eval/perplexity']:.2f}  acc {row['eval/accuracy']:.3f}")

  def checkpoint(force=False):
    if checkpointer is not None:
      checkpointer.save(state, data_state=data_iter.get_state(), cfg=cfg, force=force)

  # The non-finite check reads each step's flags one step late, so that the host never
  # waits for the step it has just dispatched.
  previous = None
  step = start_step
  try:
    with _Preemption() as preemption:
      while step < t.steps and not preemption.requested:
        batch = _global_batch(next(data_iter), rows)
        state, metrics = train_step(state, batch)
        step += 1
        if previous is not None:
          _after_step(*previous, cfg=cfg, log=log)
        previous = (step, metrics)
        if step == start_step + 1 or step % t.log_every == 0 or step == t.steps:
          report(step, _host(metrics), time.perf_counter(), batch)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
          evaluate(step)
        if t.checkpoint_every and step % t.checkpoint_every == 0:
          checkpoint()
      if previous is not None:
        _after_step(*previous, cfg=cfg, log=log)
      if preemption.requested and step < t.steps:
        log(f"SIGTERM at step {step}: checkpointing and stopping")
        checkpoint(force=True)
        return history
      evaluate(step)
      checkpoint(force=True)
      log(f"done: {step - start_step} steps in {time.perf_counter() - run_start:.1f}s")
      memory = _peak_memory()
      if memory:
        log(f"peak device memory {memory / 2**30:.2f} GiB")
        emit(step, {"peak_memory_gib": memory / 2**30})
  finally:
    if checkpointer is not None:
      checkpointer.close()
    writer.close()
  return history


def _after_step(step, metrics, *, cfg, log):
  """Reports a skipped non-finite step; stops after train.max_nonfinite_steps in a row."""
  if bool(metrics["finite"]):
    return
  run, total = int(metrics["nonfinite_run"]), int(metrics["nonfinite_total"])
  log(f"step {step}: non-finite loss or gradient, update skipped ({run} in a row, {total} "
      "in all)")
  if run >= cfg.train.max_nonfinite_steps:
    raise TrainingError(
        f"{run} non-finite steps in a row at step {step} (train.max_nonfinite_steps="
        f"{cfg.train.max_nonfinite_steps}); the last good state is in the newest checkpoint; "
        "fix: lower optim.peak_lr, raise optim.warmup_steps or inspect the data")


def _peak_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def restore_workdir(workdir: str, overrides: dict | None = None,
                    log: Callable[[str], None] = print):
  """The newest checkpoint of a training workdir: (cfg, steps, plan, state, step).

  overrides: config fields to change on top of the workdir's config.json (data, kernels;
  the model fields must match the checkpoint, which its restore checks).
  """
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise TrainingError(f"{workdir!r} holds no config.json: not a training workdir; fix: "
                        "point --workdir at the directory `taipan train` wrote")
  cfg = taipan_jax.load_config(config_path, overrides)
  steps = make_steps(cfg, lambda: taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=0,
                                                                            gumbel=1)))
  plan = _plan(cfg, steps)
  state = partition.init_state(steps, plan)
  checkpointer = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, log=log)
  try:
    restored = checkpointer.restore(_restore_target(state), cfg)
  finally:
    checkpointer.close()
  if restored is None:
    raise TrainingError(f"no readable checkpoint in {workdir!r}; fix: train first "
                        "(`taipan train --workdir=...`)")
  state, _, step = restored
  return cfg, steps, plan, state, step


def evaluate_workdir(workdir: str, *, data_path: str | None = None,
                     batches: int | None = None, overrides: dict | None = None,
                     log: Callable[[str], None] = print) -> dict:
  """Evaluates the newest checkpoint in a workdir on its held-out data (or on `data_path`,
  every document of it); returns the metrics. overrides: config fields that do not change
  the parameters (e.g. {"sal.inference_selection": "none"} switches the SALs off)."""
  overrides = dict(overrides or {})
  if data_path:            # every document of it is held out
    overrides.update({"data.path": data_path, "data.eval_fraction": 1.0 - 1e-9})
  cfg, steps, plan, state, step = restore_workdir(workdir, overrides, log)
  n = batches or cfg.train.eval_batches
  eval_batches = pipeline.make_eval_batches(cfg, n, process_index=jax.process_index(),
                                            process_count=jax.process_count())
  if not eval_batches:
    raise TrainingError(f"no evaluation data for {workdir!r}; fix: pass --data=...")
  row = _eval_metrics(partition.jit_eval_step(steps, plan), state.params, eval_batches,
                     plan.batch)
  log(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
  return {"step": step, **row}
