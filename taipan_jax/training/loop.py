"""The training loop and offline evaluation, around the jitted steps in `step.py`.

Periodic actions around `train_step`: progress lines, metrics (TensorBoard + JSON lines),
held-out evaluation, checkpoints. The run resumes from the newest readable checkpoint in
its workdir (training/workdir.py) by itself; SIGTERM (preemption) and SIGINT (Ctrl-C, a
notebook's interrupt) save and return, and a second SIGINT aborts at once.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from taipan_jax.config import load_config
from taipan_jax.data import pipeline
from taipan_jax.models import build_model
from taipan_jax.training import flops, partition, workdir as workdirs
from taipan_jax.training.checkpoint import Checkpointer, restore_target
from taipan_jax.training.metrics import MetricsWriter, format_eta
from taipan_jax.training.step import make_steps


class TrainingError(RuntimeError):
  """The run cannot go on (the message says why and what to change)."""


class _Preemption:
  """Remembers a SIGTERM or a first SIGINT so the loop can checkpoint at the next step
  boundary; a second SIGINT raises KeyboardInterrupt at once (the user means it)."""

  def __init__(self):
    self.requested = None         # the name of the signal that asked the run to stop
    self._previous = {}

  def __enter__(self):
    # Signal handlers can be installed from the main thread only (tests call train() from
    # worker threads too).
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT:
      if self.requested == "SIGINT":
        raise KeyboardInterrupt
      print("\nSIGINT: saving a checkpoint at the end of this step (press Ctrl-C again to "
            "abort without saving)", flush=True)
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def _plan(cfg, steps) -> partition.Plan:
  try:
    return partition.make_plan(cfg, steps.abstract_state)
  except partition.PartitionError as e:
    raise TrainingError(str(e)) from None


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
          log: Callable[[str], None] = print,
          profile_steps: tuple[int, int] | None = None) -> list[dict]:
  """Trains a validated config; checkpoints and metrics go to `workdir` (None: neither).

  profile_steps: (a, b) traces steps a+1 .. b with jax.profiler into `<workdir>/profile/`.
  Returns the rows written to the metrics file (train rows every log_every steps, eval rows
  every eval_every steps).
  """
  t = cfg.train
  data_cfg = cfg
  if workdir:
    # A foreign directory, a remote URL or a changed tokenizer stop here, before anything.
    workdirs.check(workdir)
    if cfg.data.task == "text":
      data_cfg = workdirs.with_tokenizer(cfg, workdirs.tokenizer_for_run(cfg, workdir,
                                                                         log=log))
  # Data first: a bad path, an empty corpus or a tokenizer mismatch stops here, before any
  # compilation or any file is written.
  corpus = pipeline.load_corpus(data_cfg)
  data_iter = pipeline.make_train_iterator(data_cfg, process_index=jax.process_index(),
                                           process_count=jax.process_count(), corpus=corpus)
  eval_batches = pipeline.make_eval_batches(data_cfg, t.eval_batches, corpus=corpus,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count())

  steps = make_steps(cfg, lambda: build_model(
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
    if is_main:
      workdirs.own(workdir)
    checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints, log=log)
    restored = checkpointer.restore(restore_target(state), cfg)
    if restored is not None:
      state, data_state, start_step = restored
      if data_state is not None:       # None: converted weights, no data read yet
        data_iter.set_state(data_state)
      log(f"resumed from step {start_step} in {checkpointer.directory}")
    if is_main:
      workdirs.record_start(cfg, workdir, step=start_step, log=log)
      if cfg.data.task == "text":
        workdirs.keep_tokenizer(data_cfg.data.tokenizer, workdir)
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
    row = _log_row(metrics)
    selected = np.atleast_1d(metrics["selected"])
    eval_selected, warning = None, ""
    if selected.size:     # the inference rule on this training batch, side by side
      eval_selected = np.atleast_1d(_host(eval_step(state.params, batch))["selected"])
      monitor_row, warning = selection_monitor(selected, eval_selected,
                                               t.selection_gap_warning)
      row.update(monitor_row)
    if step == start_step + 1:
      # The first step of a process compiles: its time says nothing about the speed, so it
      # is reported apart and the speed windows start after it.
      row["compile_seconds"] = seconds
      speed = f"first step (compiling) {seconds:.1f}s"
    else:
      rate = (step - window_step) * tokens_per_step / max(seconds, 1e-9)
      row.update(tokens_per_second=rate, step_seconds=seconds / max(step - window_step, 1))
      util = flops.mfu(rate / jax.device_count(), flops_per_token, peak)
      if util is not None:
        row["mfu"] = util
      eta = row["step_seconds"] * (t.steps - step)
      speed = (f"{rate:,.0f} tok/s" + (f"  mfu {util:.1%}" if util is not None else "")
               + f"  eta {format_eta(eta)}")
    emit(step, row)
    log(f"step {step:7d}/{t.steps}  loss {row['loss']:.4f}  acc {row['accuracy']:.3f}  "
        + (f"selected {selected.mean():.3f} (eval rule {eval_selected.mean():.3f})  "
           if selected.size else "")
        + f"gnorm {row['grad_norm']:.3f}  " + speed)
    if warning:
      log(warning)
    window_start, window_step = time.perf_counter(), step

  def paused(action):
    """Runs an action between steps with its time (and compilation) left out of tok/s."""
    def run(*args, **kwargs):
      nonlocal window_start
      begin = time.perf_counter()
      try:
        return action(*args, **kwargs)
      finally:
        window_start += time.perf_counter() - begin
    return run

  @paused
  def evaluate(step):
    row = _eval_metrics(eval_step, state.params, eval_batches, rows)
    if row:
      emit(step, row)
      log(f"eval at step {step}: loss {row['eval/loss']:.4f}  ppl "
          f"{row['eval/perplexity']:.2f}  acc {row['eval/accuracy']:.3f}")

  @paused
  def checkpoint(force=False):
    if checkpointer is not None:
      checkpointer.save(state, data_state=data_iter.get_state(), cfg=cfg, force=force)

  profiler = _Profiler(profile_steps, workdir, log)

  # The non-finite check reads each step's flags one step late, so that the host never
  # waits for the step it has just dispatched.
  previous = None
  step = start_step
  try:
    with _Preemption() as preemption:
      while step < t.steps and not preemption.requested:
        profiler.before(step + 1)
        batch = _global_batch(next(data_iter), rows)
        state, metrics = train_step(state, batch)
        step += 1
        profiler.after(step, metrics)
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
      profiler.stop()
      if preemption.requested and step < t.steps:
        log(f"{preemption.requested} at step {step}: checkpointing and stopping")
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
    profiler.stop()
    if checkpointer is not None:
      checkpointer.close()
    writer.close()
  return history


class _Profiler:
  """`--profile_steps=a:b`: a jax.profiler trace of steps a..b in `<workdir>/profile/`
  (open with TensorBoard's profile plugin, or Perfetto)."""

  def __init__(self, steps, workdir, log):
    self.first, self.last = steps or (0, -1)
    self.directory = os.path.join(workdir or ".", "profile")
    self.log = log
    self.running = False

  def before(self, step):
    if step == self.first and jax.process_index() == 0:
      jax.profiler.start_trace(self.directory)
      self.running = True

  def after(self, step, metrics):
    if self.running and step >= self.last:
      jax.block_until_ready(metrics)     # the trace holds the last step's device work
      self.stop()

  def stop(self):
    if self.running:
      jax.profiler.stop_trace()
      self.running = False
      self.log(f"profile of steps {self.first}..{self.last} written to {self.directory}")


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


def evaluate_workdir(workdir: str, *, data_path: str | None = None,
                     batches: int | None = None, overrides: dict | None = None,
                     log: Callable[[str], None] = print) -> dict:
  """Evaluates the newest checkpoint in a workdir on its held-out data (or on `data_path`,
  every document of it); returns the metrics and writes them to `<workdir>/eval/` (a JSON
  file per evaluation, and TensorBoard scalars under `eval/tb_<data>/`). overrides: config
  fields that do not change the parameters (e.g. {"sal.inference_selection": "none"}
  switches the SALs off); they name the result files too.

  The checkpoints are opened read-only: this can run beside the trainer writing them.
  """
  overrides = dict(overrides or {})
  variant = "".join(f"_{k}={v}" for k, v in sorted(overrides.items()))
  if data_path:
    workdirs.check_readable(workdir)
    task = load_config(os.path.join(workdir, "config.json")).data.task
    if task != "text":
      raise TrainingError(
          f"eval --data={data_path!r}: {workdir!r} holds a model trained on the {task!r} task, "
          "which reads no files; fix: leave out --data (it evaluates held-out "
          f"{task} examples) or evaluate a text run")
    # With data_path, every document of it is held out.
    overrides.update({"data.path": data_path, "data.eval_fraction": 1.0 - 1e-9})
  cfg, steps, plan, state, step = workdirs.restore(workdir, overrides, log)
  if cfg.data.task == "text" and "data.tokenizer" not in overrides:
    kept = workdirs.kept_tokenizer(workdir)
    if kept is not None:           # the workdir's own copy: right even after a move
      cfg = workdirs.with_tokenizer(cfg, kept[0])
  n = batches or cfg.train.eval_batches
  eval_batches = pipeline.make_eval_batches(cfg, n, process_index=jax.process_index(),
                                            process_count=jax.process_count())
  if not eval_batches:
    raise TrainingError(f"no evaluation data for {workdir!r}; fix: pass --data=...")
  row = _eval_metrics(partition.jit_eval_step(steps, plan), state.params, eval_batches,
                     plan.batch)
  log(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
  result = {"step": step, **row}
  if jax.process_index() == 0:
    name = (_data_name(data_path) if data_path else "held_out") + _safe(variant)
    path = write_eval_result(workdir, name, result,
                             {"data": data_path or "held-out split", "batches": n,
                              "overrides": {k: v for k, v in overrides.items()
                                            if not k.startswith("data.")}})
    log(f"wrote {path}")
  return result


def _data_name(path: str) -> str:
  base = os.path.basename(path.rstrip("/"))
  if any(c in base for c in "*?["):
    base = os.path.basename(os.path.dirname(path.rstrip("/")))
  return _safe(base) or "data"


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def write_eval_result(workdir: str, name: str, result: dict, meta: dict) -> str:
  """`<workdir>/eval/<name>_step<S>.json` and TensorBoard scalars in `<workdir>/eval/tb_<name>`
  (a run of its own next to the training curves)."""
  directory = os.path.join(workdir, "eval")
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"{name}_step{result['step']}.json")
  with open(path, "w") as f:
    json.dump({**result, **meta, "time": time.time()}, f, indent=2)
  writer = MetricsWriter(os.path.join(directory, f"tb_{name}"), jsonl=False)
  writer.write(result["step"], {k: v for k, v in result.items() if k != "step"})
  writer.close()
  return path
