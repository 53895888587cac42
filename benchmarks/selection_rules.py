"""Which selection rule should a trained Taipan use at inference? (decision e, issue 28)

For each trained workdir given, evaluates the newest checkpoint on its held-out data under
every candidate rule and prints held-out loss, recall (accuracy on the scored tokens) and the
selected fraction per SAL, beside the training-mode draw (Gumbel noise, fixed key) that the
model was trained with (a calibrated threshold on s1 - s0 was also measured, at commit
12e1ab8: docs/decisions.md has its figures):

  sign               m = [s1 > s0] (the rule before issue 28)
  positional_gumbel  the training draw with noise fixed by position
  window_rank        causal top-C of each window by margin
  window_expected    causal top-k of each window, k its expected count under the training
                     draw (the sum of sigmoid(margin))
  none / all         the SAL switched off / on for every token

  python benchmarks/selection_rules.py runs/a runs/b --out=benchmarks/results/selection_rules_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import taipan_jax
from taipan_jax.data import pipeline
from taipan_jax.training.loop import restore_workdir

RULES = ("sign", "positional_gumbel", "window_rank", "window_expected", "none", "all")


def _sals(model):
  return [layer for layer in model.layers if layer.selects]


@nnx.jit
def _sums(model, batch, key):
  logits, aux = model(batch["tokens"], token_mask=batch["segment_ids"] > 0, gumbel_key=key,
                      return_masks=True)
  w = batch["loss_mask"]
  logp = jax.nn.log_softmax(logits, -1)
  ce = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  return {"ce": (ce * w).sum(), "correct": (correct * w).sum(), "weight": w.sum(),
          "selected": aux["selected_fraction"].mean(-1),
          # the scored tokens' own selection: does the rule pick the queries?
          "selected_scored": (aux["select_masks"] * w).sum((-1, -2))}


def evaluate_rules(workdir: str, batches: int) -> dict:
  cfg, _, _, state, step = restore_workdir(workdir, log=lambda *_: None)
  model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(params=0, gumbel=1))
  nnx.update(model, state.params)
  eval_batches = [{k: jnp.asarray(v) for k, v in b.items()}
                  for b in pipeline.make_eval_batches(cfg, batches)]
  result = {"workdir": workdir, "step": int(step), "capacity": cfg.sal.capacity,
            "rules": {}}
  for rule in ("training_draw",) + RULES:
    if rule == "training_draw":
      model.train()
    else:
      model.eval()
      for sal in _sals(model):
        sal.inference_selection = rule
    sums = None
    for i, batch in enumerate(eval_batches):
      out = jax.tree.map(np.asarray, _sums(model, batch, jax.random.key(7 + i)))
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    w = max(float(sums["weight"]), 1.0)
    result["rules"][rule] = {
        "loss": float(sums["ce"]) / w, "recall": float(sums["correct"]) / w,
        "selected": [float(x) / len(eval_batches) for x in sums["selected"]],
        "scored_selected": [float(x) / w for x in sums["selected_scored"]]}
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  results = []
  for workdir in args.workdirs:
    r = evaluate_rules(workdir, args.batches)
    results.append(r)
    print(f"\n{workdir} (step {r['step']}, C = {r['capacity']})")
    print(f"  {'rule':18s} {'loss':>8s} {'recall':>7s}  selected per SAL (scored tokens)")
    for rule, m in r["rules"].items():
      sel = "  ".join(f"{a:.3f} ({b:.2f})" for a, b in zip(m["selected"], m["scored_selected"]))
      print(f"  {rule:18s} {m['loss']:8.4f} {m['recall']:7.3f}  {sel}")
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "results": results}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
