"""The small-scale study of issue 28: does the Taipan we train behave like the paper's?

One command trains and evaluates every run of the study on a CPU, through the library's own
training loop and evaluation (`taipan train` / `taipan eval` call the same functions), and
writes what came out:

    python benchmarks/study.py --jobs=2        # every run not yet done, then the report
    python benchmarks/study.py --only=recall   # one group: recall, rope, capacity, extrapolation
    python benchmarks/study.py --seeds=0       # one seed's runs of every default group
    python benchmarks/study.py --settings=L64_p8,L64_p8_far   # the first recall settings
    python benchmarks/study.py --only=budget   # the step-budget probe (not run by default)
    python benchmarks/study.py --only=long --jobs=15   # 10x the steps, on a GPU
    python benchmarks/study.py --only=long --settings=L64_p8_v256_10k --models=taipan_dense4k
    python benchmarks/study.py --only=lr_sweep --jobs=12   # steps and learning rates, on a GPU
    python benchmarks/study.py --report        # only rebuild the JSON, the plots and the tables

Resumable: each run's workdir under --root holds `study_result.json` once it is finished, and
a finished run is skipped; an interrupted run resumes from its last checkpoint. A line per
finished run shows its result, the time it took and the ETA of the rest.

Groups (docs/study.md has the account), three seeds each:
  recall         MQAR held-out recall for Taipan, Mamba-2, Transformer++, the Jamba-style and
                 the SWA-only hybrids at matched parameter counts in a setting that needs
                 attention (32-token rows, 8 pairs, vocabulary 256: Mamba-2 alone fails it)
                 and one where queries lie farther from their keys than the SAL window; Taipan
                 also evaluated with its SAL off. On request (--settings) the vocabulary-32
                 settings the study began with, L64_p8 and L64_p8_far.
  rope           Taipan with RoPE in the SAL (paper Fig. 6 analogue).
  capacity       Taipan at C in {0.05, 0.15, 0.3, 1.0} (paper Fig. 5 analogue), with the
                 selected fraction at evaluation as its measured cost.
  extrapolation  trained on 128-token rows of the Python standard library, perplexity by
                 position out to 64 x the training length on held-out files (paper Fig. 1a).
  budget         (only when named) L64_p8 at 3000 steps instead of 1000 for the models with
                 attention, one seed: whether the attention baselines learn given more steps.
  estimator      (only when named) Taipan on L64_p8 with sal.straight_through='attention':
                 whether the straight-through estimator is why the gate avoids the queries.
  recall_warmup  (only when named) Taipan with the dense-to-sparse warm-up over all its steps
                 in both default recall settings.
  warmup         (only when named) the warm-up on language modelling: the extrapolation
                 setting's Taipan with the warm-up over all its steps.
  long           (only when named; meant for a GPU) the vocabulary-32 recall settings at 10x
                 the steps, every architecture (and the estimator ablation on L64_p8), and
                 L64_p8 at vocabulary 256, which Mamba-2 alone fails: the
                 same models, data and schedule shape, so the attention baselines get the
                 steps their phase transition needs. At vocabulary 256 also Taipan's
                 capacity and RoPE ablations and the dense-to-sparse warm-up
                 (sal.dense_warmup_steps) at four lengths; the full-length warm-up also on
                 both vocabulary-32 settings. --models picks some of them.
  c1_probe       (only when named) why C = 1.0 fails: Taipan at C = 1.0 with a Mamba-2 block
                 last, and without the budget loss.
  lr_sweep       (only when named; meant for a GPU; six seeds) the default recall setting
                 at other step budgets (2000, 4000) and learning rates (3e-3, 1.2e-2) for
                 the attention baselines: whether any schedule makes them learn reliably.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "study_cpu.json")
SEEDS = (0, 1, 2)          # every group, every setting
# The default recall setting's schedule, 1200 steps of 64 rows: where its attention baselines
# learn, training accuracy passes 0.5 by step 300-700, and of four seeds piloted at 1200 and
# 2000 steps the same two learned (docs/study.md). 1200 keeps the whole study, three seeds
# in every group, within 2 hours on 2 cores.
RECALL_STEPS = 1200

# The study's models: d_model 64, 4 mixing layers' worth of parameters (~0.24M at vocabulary
# 32, ~0.25M at the default recall settings' 256, ~0.3M at the text runs' 1024). The Mamba-2
# state is kept small (d_state 2, 2 heads of 64): recall of more pairs than it holds must come
# from attention (Zoology's MQAR argument).
BASE = {
    "model.vocab_size": 32, "model.d_model": 64, "mamba.d_state": 2, "mamba.chunk_size": 16,
    "sal.head_dim": 32, "attention.head_dim": 32, "sal.capacity": 0.15,
    "optim.peak_lr": 6e-3, "optim.final_lr": 1e-4, "optim.warmup_steps": 50,
    "train.batch_size": 64, "train.log_every": 100, "train.eval_every": 0,
    "train.checkpoint_every": 200, "train.eval_batches": 8,
}
# Matched parameter counts (tests/test_benchmark_study.py checks they are within 5%).
ARCHS = {
    "taipan": {"model.pattern": "mms", "model.num_units": 2},
    "mamba2": {"model.pattern": "m", "model.num_units": 9, "loss.budget_weight": 0.0},
    "transformer": {"model.pattern": "a", "model.num_units": 4, "loss.budget_weight": 0.0,
                    "model.mlp_hidden": 224},
    "jamba": {"model.pattern": "mma", "model.num_units": 2, "loss.budget_weight": 0.0},
    "swa_hybrid": {"model.pattern": "mms", "model.num_units": 2, "sal.selection": "all",
                   "loss.budget_weight": 0.0},
}
# MQAR settings (a query in every slot after the pairs).
# The default: 32-token rows with 8 pairs at vocabulary 256 (127 keys, 128 values), where
# attention is needed at a size a CPU trains. At vocabulary 256 Mamba-2 alone failed even a
# 64-token row in 10,000 steps (the long schedule below); a 32-token row holds 8 queries, a
# quarter of its tokens. The hybrids' recall is a transition, in a few hundred steps, that a
# run makes or misses (docs/study.md). L32_p8_v256_far: a SAL window of 4 reaches the key of
# only about 5% of the queries (the first two queries can see a pair at all).
RECALL_V256 = {
    "L32_p8_v256": {"model.vocab_size": 256, "data.seq_len": 32, "data.num_kv_pairs": 8,
                    "data.num_queries": 0, "sal.window": 32, "train.steps": RECALL_STEPS},
    "L32_p8_v256_far": {"model.vocab_size": 256, "data.seq_len": 32, "data.num_kv_pairs": 8,
                        "data.num_queries": 0, "sal.window": 4, "train.steps": RECALL_STEPS},
}
# The settings the study began with (on request: `--settings=L64_p8,L64_p8_far`): 64-token
# rows, vocabulary 32, about 37% of the tokens queries. There Mamba-2 alone learns the task
# given 10,000 steps (a bag of pair features fits its state when a pair carries 8 bits), and in
# 1000 steps the attention baselines learned it in 1 run of 6. L64_p8_far's window of 8
# reaches the pair of only about 5% of the queries.
RECALL_V32 = {
    "L64_p8": {"data.seq_len": 64, "data.num_kv_pairs": 8, "data.num_queries": 0,
               "sal.window": 64, "train.steps": 1000},
    "L64_p8_far": {"data.seq_len": 64, "data.num_kv_pairs": 8, "data.num_queries": 0,
                   "sal.window": 8, "train.steps": 1000},
}
RECALL = {**RECALL_V256, **RECALL_V32}
# The step-budget probe (not in the default run: `--only=budget`): the L64_p8 setting at 3x
# the steps, seed 1 (the seed in which the SWA-only hybrid did not learn at 1000 steps), for
# the models with attention. Does a longer schedule make the attention baselines learn, and
# does Taipan's SAL then carry recall?
BUDGET_SETTING = "L64_p8"
BUDGET = {"L64_p8_3k": {**RECALL_V32[BUDGET_SETTING], "train.steps": 3000}}
BUDGET_ARCHS = ("swa_hybrid", "taipan", "transformer", "jamba")
BUDGET_SEEDS = (1,)
# The long schedule (not in the default run: `--only=long`, meant for an accelerator, where a
# 10000-step run of these models takes minutes): every recall setting at 10x the steps. The
# runs differ from their recall runs only in the step count and in how often they log and
# checkpoint, which changes nothing they learn.
LONG_STEPS = 10_000
LONG = {f"{name}_10k": {**data, "train.steps": LONG_STEPS, "train.log_every": 250,
                        "train.checkpoint_every": 1000}
        for name, data in RECALL_V32.items()}
# L64_p8 with a vocabulary of 256 (127 keys, 128 values) instead of 32: the pairs a row can
# hold carry 14 bits each instead of 8, which a bag of pair features in the Mamba-2 state no
# longer stores as cheaply (with 32 tokens Mamba-2 alone learned L64_p8 given 10,000 steps;
# with 256 it failed, 0.15-0.25 held out, while the Jamba-style hybrid learned it).
LONG["L64_p8_v256_10k"] = {**LONG["L64_p8_10k"], "model.vocab_size": 256}
# The estimator ablation (not in the default run: `--only=estimator`): Taipan whose training
# attention runs for every row, so that the straight-through gradient of an unselected
# token's mask sees the attention output it would get (sal.straight_through='attention')
# instead of o = 0. Is the default estimator why the trained gate avoids the queries?
ESTIMATOR = {"sal.straight_through": "attention"}
# The dense-to-sparse warm-up on the default recall setting (`--only=recall_warmup`): Taipan
# with the warm-up over all its steps.
RECALL_WARMUP = "taipan_dense_all"
# Why C = 1.0 fails below Mamba-2 (`--only=c1_probe`, on the default recall setting): at
# C = 1.0 every SAL mixes its attention output in with weight 1. Is it the SAL in the last
# position (the same layers with a Mamba-2 block last), or the budget loss holding alpha at
# 1 (the same model without it)?
C1_PROBES = {"taipan_c1.0_msm": {"model.pattern": "msm"},
             "taipan_c1.0_free": {"loss.budget_weight": 0.0}}
DEFAULT_GROUPS = ("recall", "rope", "capacity", "extrapolation")
ON_REQUEST_GROUPS = ("budget", "long", "estimator", "warmup", "recall_warmup", "c1_probe",
                     "lr_sweep")
CAPACITIES = (0.05, 0.15, 0.3, 1.0)
# The RoPE and capacity ablations run on the default recall setting; on request also on the
# first one (`--settings=L64_p8`).
ABLATION_SETTINGS = ("L32_p8_v256", "L64_p8")
ESTIMATOR_SETTING = "L64_p8"
# The dense-to-sparse warm-up (sal.dense_warmup_steps, docs/decisions.md added decision 7):
# in training, tokens the gate did not pick are also selected, at a rate falling linearly
# from 1 to 0 over the first N steps, so that attention learns on the queries before the gate
# decides whether to send them. Tried where the gate learned to avoid the queries.
DENSE_WARMUPS = {"taipan_dense4k": 4000, "taipan_dense6k": 6000, "taipan_dense8k": 8000,
                 "taipan_dense10k": 10000}
TEXT = {"data.task": "text", "data.seq_len": 128, "model.vocab_size": 1024,
        "train.batch_size": 16, "train.steps": 500, "sal.window": 128,
        "optim.peak_lr": 3e-3, "data.eval_fraction": 0.02}
TEXT_SETTING = "stdlib"
# The settings a default group runs; its runs in other settings run when --settings names them.
DEFAULT_SETTINGS = (*RECALL_V256, TEXT_SETTING)
# The warm-up on language modelling (`--only=warmup`, not in the default run): does the
# warm-up that made recall work cost anything where every token is in the loss? The
# extrapolation group's Taipan against the same Taipan with the warm-up over all its steps.
TEXT_WARMUP = "taipan_dense500"
# The ablations' Taipans by name: the study's Taipan with these keys changed (C = 0.15 is the
# Taipan itself).
CAPACITY_ARCHS = {f"taipan_c{c}": c for c in CAPACITIES if c != BASE["sal.capacity"]}
TAIPAN_VARIANTS = {"taipan_rope": {"sal.rope": True},
                   **{name: {"sal.capacity": c} for name, c in CAPACITY_ARCHS.items()},
                   "taipan_st_attention": ESTIMATOR,
                   **{name: {"sal.dense_warmup_steps": n} for name, n in DENSE_WARMUPS.items()},
                   TEXT_WARMUP: {"sal.dense_warmup_steps": TEXT["train.steps"]},
                   RECALL_WARMUP: {"sal.dense_warmup_steps": RECALL_STEPS},
                   **{name: {"sal.capacity": 1.0, **keys} for name, keys in C1_PROBES.items()}}
# Every model of the study: the architectures and the Taipan variants.
MODELS = {**ARCHS,
          **{name: {**ARCHS["taipan"], **keys} for name, keys in TAIPAN_VARIANTS.items()}}
# The models each long setting trains: every architecture; the estimator ablation where recall
# is possible; at vocabulary 256 (the setting that needs attention) no Transformer++ (it
# learned nothing of L64_p8 in 10,000 steps at vocabulary 32), but the capacity and RoPE
# ablations and the warm-ups. The full-length warm-up also at vocabulary 32, and where all
# but about 5% of the queries lie farther from their keys than the SAL window (a control).
LONG_ARCHS = {"L64_p8_10k": [*ARCHS, "taipan_st_attention", "taipan_dense10k"],
              "L64_p8_far_10k": [*ARCHS, "taipan_dense10k"],
              "L64_p8_v256_10k": [*(a for a in ARCHS if a != "transformer"),
                                  *CAPACITY_ARCHS, "taipan_rope", *DENSE_WARMUPS]}
EXTRAPOLATION_FACTOR = 64
# The schedule sweep (`--only=lr_sweep`, meant for an accelerator: 102 runs took 9.4 minutes on
# one H100, 12 at a time): can a learning rate or step budget make the attention baselines
# learn the default recall setting reliably? Six seeds of each attention baseline at each
# schedule (1200 steps at the recall group's 6e-3 with Taipan beside them, 2000, 4000; 1200
# and 4000 at 3e-3; 1200 at 1.2e-2). Its runs are kept apart from the CPU grid's
# (never `same_as` one of those), since they ran on another device.
SWEEP_SETTING = "L32_p8_v256"
SWEEP = {
    "L32_p8_v256": ({}, ("jamba", "swa_hybrid", "transformer", "taipan")),
    "L32_p8_v256_s2000": ({"train.steps": 2000}, ("jamba", "swa_hybrid", "transformer")),
    "L32_p8_v256_s4000": ({"train.steps": 4000}, ("jamba", "swa_hybrid")),
    "L32_p8_v256_lr3e-3": ({"optim.peak_lr": 3e-3}, ("jamba", "swa_hybrid", "transformer")),
    "L32_p8_v256_s4000_lr3e-3": ({"train.steps": 4000, "optim.peak_lr": 3e-3},
                                 ("jamba", "swa_hybrid")),
    "L32_p8_v256_lr1.2e-2": ({"optim.peak_lr": 1.2e-2}, ("jamba", "swa_hybrid", "transformer")),
}
SWEEP_SEEDS = (0, 1, 2, 3, 4, 5)
# The groups meant for an accelerator: their results go to study_gpu.json.
ACCELERATOR_GROUPS = ("long", "lr_sweep")


def stdlib() -> str:
  return sysconfig.get_paths()["stdlib"]


def runs() -> list[dict]:
  """Every run of the study: {id, group, arch, setting, seed, overrides}."""
  out = []
  for setting, data in RECALL.items():
    for arch, model in ARCHS.items():
      for seed in SEEDS:
        out.append({"group": "recall", "arch": arch, "setting": setting, "seed": seed,
                    "overrides": {**BASE, **model, **data, "train.seed": seed}})
  ablations = [("rope", "taipan_rope"), *(("capacity", arch) for arch in CAPACITY_ARCHS)]
  for setting in ABLATION_SETTINGS:
    for group, arch in ablations:
      for seed in SEEDS:
        out.append({"group": group, "arch": arch, "setting": setting, "seed": seed,
                    "overrides": {**BASE, **MODELS[arch], **RECALL[setting],
                                  "train.seed": seed}})
  text = {**TEXT, "data.path": os.path.join(stdlib(), "*.py")}
  for arch, model in ARCHS.items():
    for seed in SEEDS:
      out.append({"group": "extrapolation", "arch": arch, "setting": TEXT_SETTING,
                  "seed": seed, "overrides": {**BASE, **model, **text, "train.seed": seed}})
  for setting, data in BUDGET.items():
    for arch in BUDGET_ARCHS:
      for seed in BUDGET_SEEDS:
        out.append({"group": "budget", "arch": arch, "setting": setting, "seed": seed,
                    "overrides": {**BASE, **ARCHS[arch], **data, "train.seed": seed}})
  for seed in SEEDS:
    out.append({"group": "estimator", "arch": "taipan_st_attention",
                "setting": ESTIMATOR_SETTING, "seed": seed,
                "overrides": {**BASE, **MODELS["taipan_st_attention"],
                              **RECALL[ESTIMATOR_SETTING], "train.seed": seed}})
  for arch in ("taipan", TEXT_WARMUP):     # the Taipan's runs are the extrapolation group's
    for seed in SEEDS:
      out.append({"group": "warmup", "arch": arch, "setting": TEXT_SETTING, "seed": seed,
                  "overrides": {**BASE, **MODELS[arch], **text, "train.seed": seed}})
  for setting, data in RECALL_V256.items():
    for seed in SEEDS:
      out.append({"group": "recall_warmup", "arch": RECALL_WARMUP, "setting": setting,
                  "seed": seed,
                  "overrides": {**BASE, **MODELS[RECALL_WARMUP], **data, "train.seed": seed}})
  for setting, data in LONG.items():
    for arch in LONG_ARCHS[setting]:
      for seed in SEEDS:
        out.append({"group": "long", "arch": arch, "setting": setting, "seed": seed,
                    "overrides": {**BASE, **MODELS[arch], **data, "train.seed": seed}})
  for arch in C1_PROBES:
    for seed in SEEDS:
      setting = ABLATION_SETTINGS[0]
      out.append({"group": "c1_probe", "arch": arch, "setting": setting, "seed": seed,
                  "overrides": {**BASE, **MODELS[arch], **RECALL[setting], "train.seed": seed}})
  for setting, (schedule, archs) in SWEEP.items():
    for arch in archs:
      for seed in SWEEP_SEEDS:
        out.append({"group": "lr_sweep", "arch": arch, "setting": setting, "seed": seed,
                    "overrides": {**BASE, **MODELS[arch], **RECALL[SWEEP_SETTING], **schedule,
                                  "train.seed": seed}})
  first = {}
  for r in out:
    r["id"] = f"{r['group']}/{r['setting']}/{r['arch']}/seed{r['seed']}"
    if r["group"] in DEFAULT_GROUPS and r["setting"] not in DEFAULT_SETTINGS:
      r["on_request"] = True
    if r["group"] == "lr_sweep":        # another device's runs: never merged with the CPU's
      continue
    # A model without SAL layers reads no sal.* key, so in a setting that differs only in
    # the SAL window (L64_p8_far) its run would repeat one already in the study: it reuses
    # that run's result instead of training the same configuration again.
    key = json.dumps(_effective(r["overrides"]), sort_keys=True)
    if key in first:
      r["same_as"] = first[key]
    else:
      first[key] = r["id"]
  return out


def _effective(overrides: dict) -> dict:
  """The overrides that can change what a run computes."""
  if "s" in overrides["model.pattern"]:
    return overrides
  return {k: v for k, v in overrides.items() if not k.startswith("sal.")}


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def tokenizer_path(root: str) -> str:
  """The study's SentencePiece model, trained once on the standard library's top level."""
  from taipan_jax.data.text import TextDocuments
  from taipan_jax.data.tokenizer import train_tokenizer
  prefix = os.path.join(root, "spm1k")
  if not os.path.exists(prefix + ".model"):
    docs = TextDocuments(os.path.join(stdlib(), "*.py"), "text")
    train_tokenizer((docs[i] for i in range(len(docs))), prefix,
                    vocab_size=TEXT["model.vocab_size"])
  return prefix + ".model"


def extrapolation_document(tokenizer) -> "np.ndarray":
  """The held-out document every architecture is scored on: the standard library's asyncio
  package (not in the top-level training files), one document, 64 x the training length."""
  from taipan_jax.data.text import read_document_tokens
  n = TEXT["data.seq_len"] * EXTRAPOLATION_FACTOR + 1
  return read_document_tokens(os.path.join(stdlib(), "asyncio", "*.py"), tokenizer, n)


def query_selection(workdir: str) -> dict:
  """Where a trained model's SALs select at evaluation, and how much of their attention
  output they mix in, on the held-out MQAR rows. Per SAL: the fraction of the scored tokens
  (the queries, whose next token is the recalled value) selected, against the fraction of all
  tokens; and the mean weight eq. 5 gives the attention output (select x alpha) at the
  queries and at all tokens. A SAL can only help a query it selects and mixes in.
  -> {"eval_selected_queries", "eval_selected_all", "eval_mix_queries", "eval_mix_all":
      [per SAL]}"""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from taipan_jax.data import pipeline
  from taipan_jax.inference.load import load_workdir

  loaded = load_workdir(workdir, log=lambda *_: None)
  cfg = loaded.cfg
  graphdef, state = nnx.split(loaded.model)

  @jax.jit
  def select_and_mix(state, tokens):               # each [num_sal, batch, seq]
    _, aux = nnx.merge(graphdef, state)(tokens, return_masks=True)
    return aux["select_masks"], aux["mix_weights"]

  sums = {key: 0.0 for key in ("selected_queries", "selected_all", "mix_queries", "mix_all")}
  weight, count = 0.0, 0
  for batch in pipeline.make_eval_batches(cfg, cfg.train.eval_batches):
    select, mix = (np.asarray(t) for t in select_and_mix(state, jnp.asarray(batch["tokens"])))
    w = np.asarray(batch["loss_mask"])
    for name, t in (("selected", select), ("mix", mix)):
      sums[f"{name}_queries"] = sums[f"{name}_queries"] + (t * w).sum(axis=(1, 2))
      sums[f"{name}_all"] = sums[f"{name}_all"] + t.sum(axis=(1, 2))
    weight += w.sum()
    count += w.size
  return {f"eval_{key}": [float(x) for x in np.atleast_1d(total)
                          / (weight if key.endswith("queries") else count)]
          for key, total in sums.items()}


def run_one(run: dict, root: str) -> dict:
  """Trains (resuming if interrupted) and evaluates one run; returns its result."""
  import jax
  import numpy as np
  from taipan_jax import count_params, load_config
  from taipan_jax.inference import long_context
  from taipan_jax.inference.load import load_workdir
  from taipan_jax.training.loop import evaluate_workdir, train

  workdir = os.path.join(root, run["id"])
  overrides = dict(run["overrides"])
  if run["setting"] == TEXT_SETTING:
    overrides["data.tokenizer"] = tokenizer_path(root)
  cfg = load_config("tiny", overrides)
  start = time.perf_counter()
  rows = train(cfg, workdir, log=print)         # into the run's log under <root>/logs
  train_seconds = time.perf_counter() - start
  if max((r["step"] for r in rows), default=0) < cfg.train.steps:
    # Stopped early (SIGTERM/SIGINT save and return): no result, the rerun resumes it.
    raise SystemExit(f"{run['id']}: stopped before step {cfg.train.steps}; rerun to resume")
  last_train = [r for r in rows if "selected_sal0" in r][-1:] or [{}]
  result = {"id": run["id"], "group": run["group"], "arch": run["arch"],
            "setting": run["setting"], "seed": run["seed"], "steps": cfg.train.steps,
            "train_seconds": train_seconds, "device": jax.devices()[0].device_kind,
            "jax": jax.__version__,
            "params": count_params(cfg),
            "train_selected": [v for k, v in sorted(last_train[0].items())
                               if k.startswith("selected_sal")]}
  quiet = lambda *_: None
  held_out = _held_out(workdir)
  result.update(loss=held_out["loss"], eval_selected=held_out["eval_selected"])
  if run["setting"] != TEXT_SETTING:
    result["recall"] = held_out["accuracy"]
    if "s" in cfg.model.pattern and cfg.sal.selection != "all":
      off = evaluate_workdir(workdir, overrides={"sal.inference_selection": "none"},
                             log=quiet)
      result.update(recall_sal_off=off["eval/accuracy"], loss_sal_off=off["eval/loss"])
    if "s" in cfg.model.pattern:
      result.update(query_selection(workdir))
  else:
    n = TEXT["data.seq_len"] * EXTRAPOLATION_FACTOR
    loaded = load_workdir(workdir, {"attention.max_cache_len": n}, log=quiet)
    tokens = extrapolation_document(loaded.tokenizer)
    nll = long_context.stream_nll(loaded.model, tokens, segment_len=n, mesh=None, log=None)
    result["by_position"] = long_context.bucket_table(nll, first=TEXT["data.seq_len"])
  result["seconds"] = time.perf_counter() - start
  return result


def _held_out(workdir: str) -> dict:
  """A run's held-out evaluation (`taipan eval`): loss, accuracy (MQAR: recall) and each
  SAL's selected fraction under the inference rule."""
  from taipan_jax.training.loop import evaluate_workdir
  ev = evaluate_workdir(workdir, log=lambda *_: None)
  return {"loss": ev["eval/loss"], "accuracy": ev["eval/accuracy"],
          "eval_selected": [v for k, v in sorted(ev.items()) if k.startswith("eval/selected_sal")]}


def _log_path(root, run):
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  return os.path.join(root, "logs", run["id"].replace("/", "_") + ".log")


def _result_path(root, run):
  """Where a run's result is written (for a run that repeats another: that run's)."""
  return os.path.join(root, run.get("same_as", run["id"]), "study_result.json")


def _child(run_id: str, root: str) -> int:
  run = next(r for r in runs() if r["id"] == run_id)
  result = run_one(run, root)
  _write_json(_result_path(root, run), result)
  return 0


def _summary(result: dict) -> str:
  if "recall" in result:
    s = f"recall {result['recall']:.3f}"
    if "recall_sal_off" in result:
      s += f" (SAL off {result['recall_sal_off']:.3f})"
    if result.get("eval_selected"):
      s += (" selected train " + "/".join(f"{x:.2f}" for x in result["train_selected"])
            + " eval " + "/".join(f"{x:.2f}" for x in result["eval_selected"]))
    return s
  last = result["by_position"][-1]
  return f"ppl {result['by_position'][0]['ppl']:.2f} first bucket, {last['ppl']:.2f} at " \
         f"{last['from']}-{last['to']}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--root", default=os.path.join(ROOT, "runs", "study"),
                      help="where the runs' workdirs go")
  parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
  parser.add_argument("--only", default="",
                      help="comma-separated groups to run (default: "
                           + ", ".join(DEFAULT_GROUPS) + "; " + ", ".join(ON_REQUEST_GROUPS)
                           + " run only when named)")
  parser.add_argument("--seeds", default="",
                      help="comma-separated seeds to run in every group named (default: "
                           + ",".join(map(str, SEEDS)) + ")")
  parser.add_argument("--settings", default="",
                      help="comma-separated settings to run (default: "
                           + ", ".join(DEFAULT_SETTINGS) + "; the first recall settings, "
                           + ", ".join(RECALL_V32) + ", only when named)")
  parser.add_argument("--models", default="",
                      help="comma-separated models to run, e.g. taipan,jamba (default: all)")
  parser.add_argument("--report", action="store_true", help="only rebuild the outputs")
  parser.add_argument("--diagnose", action="store_true",
                      help="add what finished runs written by older code lack (where the "
                           "SALs of recall runs select and how much they mix in, the held-out "
                           "loss of text runs), "
                           "then rebuild the outputs")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return _child(args.child, args.root)
  all_runs = runs()
  groups = set(filter(None, args.only.split(","))) or set(DEFAULT_GROUPS)
  known = set(DEFAULT_GROUPS) | set(ON_REQUEST_GROUPS)
  if groups - known:
    parser.error(f"--only={args.only!r}: unknown group(s) {sorted(groups - known)}; "
                 f"choose from {sorted(known)}")
  try:
    seeds = {int(x) for x in args.seeds.split(",") if x}
  except ValueError:
    parser.error(f"--seeds={args.seeds!r}: give comma-separated integers, e.g. --seeds=0,1")
  settings = set(filter(None, args.settings.split(",")))
  known_settings = {r["setting"] for r in all_runs if r["group"] in groups}
  if settings - known_settings:
    parser.error(f"--settings={args.settings!r}: no run of group(s) {sorted(groups)} has "
                 f"setting(s) {sorted(settings - known_settings)}; choose from "
                 f"{sorted(known_settings)}")
  models = set(filter(None, args.models.split(",")))
  known_models = {r["arch"] for r in all_runs if r["group"] in groups
                  and (not settings or r["setting"] in settings)}
  if models - known_models:
    parser.error(f"--models={args.models!r}: no run of group(s) {sorted(groups)}"
                 + (f" in setting(s) {sorted(settings)}" if settings else "")
                 + f" is model(s) {sorted(models - known_models)}; choose from "
                 f"{sorted(known_models)}")
  # Seed by seed, so a study stopped early still covers every cell once; within a seed the
  # settings where something can be learned first, the far setting (nothing learned in
  # seed 0) last.
  order = {"recall": 0, "capacity": 1, "rope": 2, "extrapolation": 3, "budget": 4,
           "estimator": 5, "warmup": 6, "recall_warmup": 7, "c1_probe": 8, "long": 9,
           "lr_sweep": 10}
  by_id = {r["id"]: r for r in all_runs}
  # A picked run that repeats another is done by training that one (once, whatever its group).
  picked = {r.get("same_as", r["id"]) for r in all_runs if r["group"] in groups
            and (not seeds or r["seed"] in seeds)
            and (r["setting"] in settings if settings else not r.get("on_request"))
            and (not models or r["arch"] in models)}
  todo = sorted((by_id[i] for i in picked if not os.path.exists(_result_path(args.root, by_id[i]))),
                key=lambda r: (r["seed"], "_far" in r["setting"], order[r["group"]]))
  if (args.report or args.diagnose) and not any(
      os.path.exists(_result_path(args.root, r)) for r in all_runs):
    # Rebuilding from a wrong or empty root would replace the committed tables with none.
    parser.error(f"--root={args.root!r} holds no finished study run, so there is nothing to "
                 "report; give the directory the runs were written to (default "
                 f"{os.path.join(ROOT, 'runs', 'study')!r})")
  if args.diagnose:
    _diagnose(args.root)
  elif not args.report:
    if any(r["setting"] == TEXT_SETTING for r in todo):
      os.makedirs(args.root, exist_ok=True)
      tokenizer_path(args.root)           # once, before the runs that share it
    _run_all(todo, args.root, args.jobs)
  import study_report
  study_report.write(args.root, all_runs, RESULTS)
  return 0


def _diagnose(root: str) -> None:
  """Backfills what finished results written before it lack: query_selection (with the mix
  weights) into the recall results of models with SALs, the held-out loss and selection into
  text results. Both are evaluations of the run's last checkpoint, the same whenever they
  run; a result whose checkpoints are not under `root` (an accelerator's run, kept as JSON
  only) is left as it is."""
  for run in runs():
    path = _result_path(root, run)
    if not os.path.exists(path) or "same_as" in run:
      continue
    with open(path) as f:
      result = json.load(f)
    workdir = os.path.join(root, run["id"])
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
      continue
    if run["setting"] == TEXT_SETTING and "loss" not in result:
      held_out = _held_out(workdir)
      result.update(loss=held_out["loss"], eval_selected=held_out["eval_selected"])
      _write_json(path, result)
      print(f"{run['id']}: held-out loss {result['loss']:.4f}", flush=True)
    if (run["setting"] != TEXT_SETTING and "s" in run["overrides"]["model.pattern"]
        and "eval_mix_queries" not in result):
      result.update(query_selection(workdir))
      _write_json(path, result)
      fmt = lambda xs: "/".join(f"{x:.3f}" for x in xs)
      print(f"{run['id']}: queries selected {fmt(result['eval_selected_queries'])} of all "
            f"{fmt(result['eval_selected_all'])}; mix at queries "
            f"{fmt(result['eval_mix_queries'])} at all {fmt(result['eval_mix_all'])}",
            flush=True)


# XLA:CPU's YNNPACK fusions and its multi-threaded Eigen are slower on these small models,
# one run a core: per-run throughput without them, one run pinned to each of 2 cores,
# 150 steps (jax 0.10.2): Mamba-2 6.6K -> 8.4K tokens/s, Taipan 9.5K -> 10.7K, Jamba
# 9.8K -> 11.5K, SWA-only 9.8K -> 10.7K, Transformer++ 12.9K -> 13.0K.
FAST_CPU_FLAGS = "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_multi_thread_eigen=false"


def _fast_cpu_flags() -> str:
  """FAST_CPU_FLAGS where this jaxlib knows them (an unknown XLA flag is fatal), else ''."""
  probe = subprocess.run(
      [sys.executable, "-c", "import jax, jax.numpy as jnp; jax.jit(jnp.sin)(jnp.ones(2))"],
      env=dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " "
                                      + FAST_CPU_FLAGS).strip()),
      capture_output=True)
  return FAST_CPU_FLAGS if probe.returncode == 0 else ""


def _run_all(todo: list[dict], root: str, jobs: int) -> None:
  print(f"{len(todo)} runs to do, {jobs} at a time; results under {root}", flush=True)
  start, done, running = time.perf_counter(), 0, []
  # Seeds of one model compile the same programs: a persistent cache compiles them once.
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=os.path.join(root, ".jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  if jobs > 1:
    # Several runs on one accelerator: each takes the memory it needs, not 75% of it.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  flags = _fast_cpu_flags()
  if flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  # Each run on its own cores: two runs sharing two cores unpinned lose time to each other's
  # thread pools and to migration.
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  per = len(cores) // jobs
  free_slots = [tuple(cores[i * per:(i + 1) * per]) for i in range(jobs)] if per else []
  pending = list(todo)

  def stop(signum, frame):          # `kill` stops the runs as Ctrl-C does, none left behind
    raise KeyboardInterrupt
  previous = signal.signal(signal.SIGTERM, stop)
  try:
    while pending or running:
      while pending and len(running) < jobs:
        run = pending.pop(0)
        log = open(_log_path(root, run), "a")     # beside the workdir: that one is the run's
        slot = free_slots.pop(0) if free_slots else None
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--root", root,
                                 "--child", run["id"]], stdout=log, stderr=subprocess.STDOUT,
                                env=env,
                                preexec_fn=(lambda s=slot: os.sched_setaffinity(0, s))
                                if slot else None)
        running.append((run, proc, log, time.perf_counter(), slot))
      time.sleep(1.0)
      for item in list(running):
        run, proc, log, t0, slot = item
        if proc.poll() is None:
          continue
        running.remove(item)
        log.close()
        if slot:
          free_slots.append(slot)
        done += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (len(todo) - done)
        if proc.returncode:
          print(f"[{done}/{len(todo)}] {run['id']} FAILED (rc {proc.returncode}); see "
                f"{_log_path(root, run)}", flush=True)
          continue
        with open(_result_path(root, run)) as f:
          result = json.load(f)
        print(f"[{done}/{len(todo)}] {run['id']}: {_summary(result)}  "
              f"{time.perf_counter() - t0:.0f}s  elapsed {elapsed / 60:.1f} min  "
              f"ETA {eta / 60:.1f} min", flush=True)
  except KeyboardInterrupt:
    for _, proc, *_ in running:
      proc.terminate()         # SIGTERM: each run checkpoints and stops; rerun to resume
    for _, proc, *_ in running:
      proc.wait()
    print("interrupted: finished runs are kept; rerun the same command to resume",
          flush=True)
    raise SystemExit(130)
  finally:
    signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  sys.exit(main())
