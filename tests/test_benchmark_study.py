"""The study's grid (benchmarks/study.py): matched models, every run named once, and the
report built from finished runs."""
import json
import os
import sys

import numpy as np
import pytest

import taipan_jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import study  # noqa: E402
import study_report  # noqa: E402


@pytest.mark.parametrize("setting", list(study.RECALL) + ["L64_p8_v256_10k"])
def test_study_models_have_matched_parameter_counts(setting):
  data = study.RECALL.get(setting) or study.LONG[setting]
  counts = {arch: taipan_jax.count_params(taipan_jax.load_config(
      "tiny", {**study.BASE, **model, **data}))
      for arch, model in study.ARCHS.items()}
  taipan = counts["taipan"]
  for arch, n in counts.items():
    assert abs(n - taipan) / taipan < 0.05, f"{arch}: {n:,} vs taipan {taipan:,}"


def test_every_run_is_named_once_and_its_config_loads():
  runs = study.runs()
  assert len({r["id"] for r in runs}) == len(runs)
  for r in runs:
    overrides = dict(r["overrides"])
    if r["setting"] == study.TEXT_SETTING:
      overrides["data.tokenizer"] = "unused.model"     # validated, not read
    cfg = taipan_jax.load_config("tiny", overrides)
    assert cfg.train.seed == r["seed"]
  groups = {r["group"] for r in runs}
  assert groups == set(study.DEFAULT_GROUPS) | set(study.ON_REQUEST_GROUPS)
  budget = [r for r in runs if r["group"] == "budget"]
  assert {r["arch"] for r in budget} == set(study.BUDGET_ARCHS)
  long = [r for r in runs if r["group"] == "long"]
  # every architecture in both recall settings, the estimator ablation where recall is
  # possible, the full-length warm-up in both; at vocabulary 256 every architecture but
  # Transformer++, and the Taipan ablations (capacity, RoPE) and warm-ups
  variants = {f"taipan_c{c}" for c in study.CAPACITIES if c != study.BASE["sal.capacity"]}
  variants |= {"taipan_rope"} | set(study.DENSE_WARMUPS)
  expected = {"L64_p8_10k": set(study.ARCHS) | {"taipan_st_attention", "taipan_dense10k"},
              "L64_p8_far_10k": set(study.ARCHS) | {"taipan_dense10k"},
              "L64_p8_v256_10k": (set(study.ARCHS) - {"transformer"}) | variants}
  assert len(long) == sum(map(len, expected.values())) * len(study.SEEDS)
  for setting, archs in expected.items():
    assert {r["arch"] for r in long if r["setting"] == setting} == archs, setting
  # The schedule sweep: six seeds of each model at each schedule, each run the recall group's
  # run of that model with only the step count and/or learning rate changed, and never
  # merged with a CPU run (it ran on another device).
  sweep = [r for r in runs if r["group"] == "lr_sweep"]
  assert len(sweep) == sum(len(archs) for _, archs in study.SWEEP.values()) * 6 == 102
  recall = {(r["arch"], r["seed"]): r for r in runs
            if r["group"] == "recall" and r["setting"] == study.SWEEP_SETTING}
  for r in sweep:
    assert "same_as" not in r and r["seed"] in study.SWEEP_SEEDS
    base = recall[(r["arch"], r["seed"] % len(study.SEEDS))]["overrides"]
    diff = {k for k in set(r["overrides"]) | set(base)
            if r["overrides"].get(k) != base.get(k)}
    assert diff <= {"train.steps", "optim.peak_lr", "train.seed"}, (r["id"], diff)
    assert r["overrides"]["train.seed"] == r["seed"]
  # Each C = 1.0 probe is the capacity group's C = 1.0 Taipan with one key changed.
  c1 = {(r["setting"], r["seed"]): r["overrides"] for r in runs
        if r["group"] == "capacity" and r["arch"] == "taipan_c1.0"}
  probes = [r for r in runs if r["group"] == "c1_probe"]
  assert {r["arch"] for r in probes} == set(study.C1_PROBES) and len(probes) == 6
  for r in probes:
    base = c1[(r["setting"], r["seed"])]
    diff = {k: v for k, v in r["overrides"].items() if base.get(k) != v}
    assert diff == study.C1_PROBES[r["arch"]], (r["id"], diff)
  v256 = [r for r in long if r["setting"] == "L64_p8_v256_10k"]
  # Each v256 Taipan variant is the v256 Taipan with one setting changed.
  for r in v256:
    if r["arch"].startswith("taipan_"):
      base = next(x for x in v256 if x["arch"] == "taipan" and x["seed"] == r["seed"])
      diff = {k: v for k, v in r["overrides"].items() if base["overrides"].get(k) != v}
      assert len(diff) == 1, (r["arch"], diff)
      (key, value), = diff.items()
      assert {"sal.capacity": r["arch"] == f"taipan_c{value}",
              "sal.rope": r["arch"] == "taipan_rope" and value is True,
              "sal.dense_warmup_steps": study.DENSE_WARMUPS.get(r["arch"]) == value}[key]
  # The probe and the long schedule differ from their recall runs only in the step count
  # (and, for the long schedule, how often they log and checkpoint; the vocabulary in its
  # v256 setting).
  for r in budget + [r for r in long if r["arch"] in study.ARCHS]:
    setting = (study.BUDGET_SETTING if r["group"] == "budget"
               else r["setting"].replace("_v256", "")[:-len("_10k")])
    same = next(x for x in runs if x["group"] == "recall" and x["arch"] == r["arch"]
                and x["setting"] == setting and x["seed"] == r["seed"])
    diff = {k for k in r["overrides"] if r["overrides"][k] != same["overrides"].get(k)}
    vocab = {"model.vocab_size"} if "_v256" in r["setting"] else set()
    assert diff - {"train.log_every", "train.checkpoint_every"} == {"train.steps"} | vocab
    if vocab:
      assert r["overrides"]["model.vocab_size"] == 256
    assert r["overrides"]["train.steps"] > same["overrides"]["train.steps"]
  by_id = {r["id"]: r for r in runs}
  for r in runs:    # a reused run differs from the one it reuses only in keys it never reads
    if "same_as" in r:
      same = by_id[r["same_as"]]
      assert "same_as" not in same
      diff = {k for k in r["overrides"] if r["overrides"][k] != same["overrides"].get(k)}
      if same["group"] == r["group"]:      # the far setting's models without a SAL
        assert "s" not in r["overrides"]["model.pattern"]
        assert diff and all(k.startswith("sal.") for k in diff), diff
      else:                                # the warm-up group's baseline: the same run
        assert r["group"] == "warmup" and same["group"] == "extrapolation" and not diff
  # Every group but the one-seed probe has the three seeds in every setting.
  assert len(study.SEEDS) >= 3
  cells = {}
  for r in runs:
    if r["group"] != "budget":
      cells.setdefault((r["group"], r["setting"], r["arch"]), set()).add(r["seed"])
  assert all(seeds == set(study.SWEEP_SEEDS if group == "lr_sweep" else study.SEEDS)
             for (group, _, _), seeds in cells.items())
  # The default run: every architecture in both default recall settings and the text
  # setting, the ablations in the first default recall setting; the vocabulary-32 settings
  # only on request. The models without a SAL train once per vocabulary (the far setting
  # differs only in the SAL window).
  default = [r for r in runs if r["group"] in study.DEFAULT_GROUPS and not r.get("on_request")]
  assert {r["setting"] for r in default} == set(study.DEFAULT_SETTINGS)
  assert {r["setting"] for r in runs if r.get("on_request")} == set(study.RECALL_V32)
  assert {(r["setting"], r["arch"]) for r in default if r["group"] == "recall"} == {
      (s, a) for s in study.RECALL_V256 for a in study.ARCHS}
  assert {r["arch"] for r in default if r["group"] == "recall" and "same_as" in r} == {
      "mamba2", "transformer", "jamba"}
  assert {(r["group"], r["setting"]) for r in default if r["group"] in ("rope", "capacity")} \
      == {("rope", study.ABLATION_SETTINGS[0]), ("capacity", study.ABLATION_SETTINGS[0])}
  for r in default:
    if r["group"] != "extrapolation":
      assert r["overrides"]["model.vocab_size"] == 256 and r["overrides"]["data.seq_len"] == 32
  warm = [r for r in runs if r["group"] == "recall_warmup"]
  assert {(r["setting"], r["arch"]) for r in warm} == {
      (s, study.RECALL_WARMUP) for s in study.RECALL_V256}
  for r in warm:
    base = by_id[f"recall/{r['setting']}/taipan/seed{r['seed']}"]
    diff = {k: v for k, v in r["overrides"].items() if base["overrides"].get(k) != v}
    assert diff == {"sal.dense_warmup_steps": r["overrides"]["train.steps"]}
  warmup = [r for r in runs if r["group"] == "warmup" and "same_as" not in r]
  assert {r["arch"] for r in warmup} == {study.TEXT_WARMUP}
  for r in warmup:
    base = by_id[f"extrapolation/{study.TEXT_SETTING}/taipan/seed{r['seed']}"]
    diff = {k: v for k, v in r["overrides"].items() if base["overrides"].get(k) != v}
    assert diff == {"sal.dense_warmup_steps": study.TEXT["train.steps"]}
  assert {r["arch"] for r in runs if r["group"] == "capacity"} == {
      f"taipan_c{c}" for c in study.CAPACITIES if c != study.BASE["sal.capacity"]}


def test_report_tables_from_finished_runs(tmp_path, monkeypatch):
  runs = study.runs()
  rng = np.random.default_rng(0)
  ablations = [r for r in runs if r["group"] in ("capacity", "rope")][:2]
  budget = [r for r in runs if r["group"] == "budget"][:2]
  long = [r for r in runs if r["group"] == "long" and r["arch"] == "taipan"][:2]
  budget += [r for r in runs if r["group"] == "estimator"][:2]
  budget += [r for r in runs if r["group"] == "warmup" and "same_as" not in r][:2]
  budget += [r for r in runs if r["group"] == "recall_warmup"][:2]
  sweep = [r for r in runs if r["group"] == "lr_sweep" and r["arch"] == "jamba"
           and r["setting"] == "L32_p8_v256"][:2]
  v32 = [r for r in runs if r["group"] == "recall" and r["setting"] == "L64_p8"][:2]
  trained = [r for r in runs if "same_as" not in r]
  for r in (trained[:20] + [r for r in runs if r["group"] == "extrapolation"][:2] + ablations
            + budget + long + v32 + sweep):
    path = tmp_path / r["id"]
    path.mkdir(parents=True)
    result = {**{k: r[k] for k in ("id", "group", "arch", "setting", "seed")},
              "train_selected": [0.15, 0.14], "eval_selected": [0.15, 0.15], "seconds": 450.0}
    if r["setting"] == study.TEXT_SETTING:
      result["by_position"] = [{"from": 0, "to": 128, "ppl": 9.0},
                               {"from": 128, "to": 256, "ppl": 8.5}]
      result["loss"] = 2.5 if r["group"] == "warmup" else 2.0
    else:
      result.update(recall=float(rng.random()), recall_sal_off=0.1, loss=1.0,
                    eval_selected_queries=[0.03, 0.02])
      if "s" in r["overrides"]["model.pattern"]:
        result.update(eval_mix_queries=[0.5, 0.004], eval_mix_all=[0.1, 0.1])
    if r["group"] == "long":
      result["device"] = "NVIDIA H200"
    if r["group"] == "lr_sweep":
      result.update(device="NVIDIA H100 80GB HBM3", recall=1.0 if r["seed"] == 0 else 0.1)
    (path / "study_result.json").write_text(json.dumps(result))
  monkeypatch.setattr(study_report, "DOC", str(tmp_path / "study.md"))
  monkeypatch.setattr(study_report, "IMAGES", str(tmp_path / "images"))
  study_report.write(str(tmp_path), runs, str(tmp_path / "study.json"))
  doc = (tmp_path / "study.md").read_text()
  assert "| taipan eval, of queries | 0.025" in doc
  assert "24 of the 48 runs of the default study" in doc and "10 of 55 runs" in doc
  assert "| taipan, SAL off at eval |" in doc and "0-128" in doc
  assert "3.0 hours of run time together (450 s a run" in doc   # 24 x 450 s
  recall = doc.split("### Recall (MQAR")[1].split("###")[0]
  assert "| model | L32_p8_v256 | L32_p8_v256_far | L64_p8 | L64_p8_far |" in recall
  probe = doc.split("### Step budget probe")[1].split("###")[0]
  assert "| 1000 steps | 3000 steps |" in probe
  assert f"| {budget[0]['arch']} |" in probe
  for name in ("study_recall.png", "study_recall_v32.png", "study_ablations.png",
               "study_extrapolation.png", "study_long.png"):
    assert (tmp_path / "images" / name).exists() and f"(images/{name})" in doc
  saved = json.loads((tmp_path / "study.json").read_text())
  n_long = sum(r["group"] == "long" for r in runs)
  default = [r for r in runs if r["group"] in study.DEFAULT_GROUPS and not r.get("on_request")]
  n_repeats = sum("same_as" in r for r in default)
  assert n_repeats == 9        # Mamba-2, Transformer++, Jamba x 3 seeds in L32_p8_v256_far
  n_extra = sum(r["group"] in study.ON_REQUEST_GROUPS + study.DEFAULT_GROUPS
                and r["group"] not in study.ACCELERATOR_GROUPS and "same_as" not in r
                for r in runs) - 48
  assert saved["runs_done"] == 24 and saved["on_request_runs_done"] == 10
  assert saved["on_request_runs_total"] == n_extra == 55
  assert saved["runs_total"] == len(default) - n_repeats == 48
  # A repeated cell shows its identical run's result, marked as such.
  by_id = {r["id"]: r for r in saved["results"]}
  far = by_id["recall/L32_p8_v256_far/mamba2/seed0"]
  assert far["same_as"] == "recall/L32_p8_v256/mamba2/seed0"
  assert far["setting"] == "L32_p8_v256_far"
  assert far["recall"] == by_id["recall/L32_p8_v256/mamba2/seed0"]["recall"]
  gpu = json.loads((tmp_path / "study_gpu.json").read_text())
  assert gpu["runs_done"] == 4
  assert gpu["devices"] == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
  assert all(r["group"] in ("long", "lr_sweep") for r in gpu["results"])
  sweep = doc.split("### Schedule sweep on L32_p8_v256")[1].split("###")[0]
  assert "| jamba | **1 of 2** (1.00, 0.10) |" in sweep and "1200 steps, lr 0.006" in sweep
  estimator = doc.split("### Straight-through estimator")[1].split("###")[0]
  assert "| taipan (o = attention, dense in training) |" in estimator
  assert "| taipan (o = 0, default) |" in estimator and "0.025" in estimator
  warm = doc.split("### Dense-to-sparse warm-up on language modelling")[1].split("###")[0]
  assert "| taipan (the paper's training) | 2.000 ± 0.000 (2) |" in warm
  assert "| taipan, warm-up over all 500 steps | 2.500 ± 0.000 (2) |" in warm
  assert "ppl 128-256" in warm
  warm = doc.split("### Dense-to-sparse warm-up on the default recall")[1].split("###")[0]
  assert "| model | L32_p8_v256 |" in warm and f"| {study.RECALL_WARMUP}: queries selected | 0.025" in warm
  assert "| taipan, SAL off at eval |" in warm
  mix = doc.split("### How much attention reaches the queries on L32_p8_v256 ")[1].split("###")[0]
  recall0 = by_id["recall/L32_p8_v256/taipan/seed0"]["recall"]
  assert f"| taipan | {recall0:.3f} · 0.50 / 0.00 |" in mix
  assert "| mamba2 |" not in mix and "| seed 0 |" in mix
  long_table = doc.split("### Long schedule")[1].split("###")[0]
  assert "NVIDIA H200" in long_table and "| taipan: queries selected | 0.025" in long_table


def test_query_selection_counts_the_eval_rules_selection(tmp_path):
  """The diagnostic's fraction over all tokens is the trainer's eval/selected_sal*, and its
  fraction over the queries counts the same masks on the scored tokens only."""
  from taipan_jax.training.loop import evaluate_workdir, train
  cfg = taipan_jax.load_config("tiny", {**study.BASE, **study.ARCHS["taipan"],
                                        **study.RECALL["L64_p8"], "train.steps": 3,
                                        "train.batch_size": 8, "train.eval_batches": 2,
                                        "train.checkpoint_every": 0, "train.log_every": 1})
  workdir = str(tmp_path / "run")
  train(cfg, workdir, log=lambda *_: None)
  got = study.query_selection(workdir)
  ev = evaluate_workdir(workdir, log=lambda *_: None)
  expect = [ev[f"eval/selected_sal{i}"] for i in range(2)]
  np.testing.assert_allclose(got["eval_selected_all"], expect, atol=1e-6)
  assert len(got["eval_selected_queries"]) == 2
  assert all(0.0 <= x <= 1.0 for x in got["eval_selected_queries"])
  # The mix weight is select x alpha: at most the selected fraction, above 0 where any
  # token is selected (alpha = softmax(scores)[1] > 0).
  for mix, sel in (("eval_mix_all", "eval_selected_all"),
                   ("eval_mix_queries", "eval_selected_queries")):
    assert all(0.0 < m <= s for m, s in zip(got[mix], got[sel]))
  # At initialisation the gate knows nothing of queries: about C of them are selected too.
  assert all(abs(x - study.BASE["sal.capacity"]) < 0.08 for x in got["eval_selected_queries"])


def test_models_option_picks_runs_and_refuses_unknown_names(tmp_path, monkeypatch, capsys):
  picked = []
  monkeypatch.setattr(study, "_run_all", lambda todo, root, jobs: picked.extend(todo))
  monkeypatch.setattr(study_report, "write", lambda *a: None)
  study.main(["--root", str(tmp_path), "--only=long", "--settings=L64_p8_v256_10k",
              "--models=taipan_dense4k,jamba", "--seeds=1"])
  assert sorted(r["id"] for r in picked) == [
      "long/L64_p8_v256_10k/jamba/seed1", "long/L64_p8_v256_10k/taipan_dense4k/seed1"]
  with pytest.raises(SystemExit):
    study.main(["--root", str(tmp_path), "--only=long", "--settings=L64_p8_10k",
                "--models=taipan_dense4k"])
  err = capsys.readouterr().err
  assert "--models='taipan_dense4k'" in err and "choose from" in err and "'jamba'" in err


def test_report_from_a_root_without_runs_is_refused(tmp_path, capsys):
  """A mistyped --root must not replace the committed tables with an empty study."""
  with pytest.raises(SystemExit):
    study.main(["--report", "--root", str(tmp_path / "missing")])
  assert "holds no finished study run" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["mamba2", "transformer", "jamba"])
def test_models_without_sal_ignore_the_sal_settings(arch):
  """The study reuses these models' L64_p8 runs for L64_p8_far, which differs only in sal.*
  keys: the same seed must give the same parameters and the same logits under both."""
  from flax import nnx
  logits = []
  for setting in ("L64_p8", "L64_p8_far"):
    cfg = taipan_jax.load_config("tiny", {**study.BASE, **study.ARCHS[arch],
                                          **study.RECALL[setting]})
    model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 32, (2, 64)).astype(np.int32)
    out = model(tokens)
    logits.append(np.asarray(out[0] if isinstance(out, tuple) else out))
  np.testing.assert_array_equal(logits[0], logits[1])


def test_fast_cpu_flags_are_probed_before_use(monkeypatch):
  """An unknown XLA flag aborts every run, so the study sets its CPU flags only where a child
  process accepts them."""
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(study, "FAST_CPU_FLAGS", "--xla_cpu_no_such_flag_for_the_test=1")
  assert study._fast_cpu_flags() == ""
  monkeypatch.setattr(study, "FAST_CPU_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  assert study._fast_cpu_flags() == "--xla_cpu_multi_thread_eigen=false"


def test_seeds_and_settings_options_and_repeated_runs(tmp_path, monkeypatch):
  """Without --seeds a group runs all its seeds in its default settings; --seeds names the
  seeds of every group, --settings its settings (the vocabulary-32 ones run only when named);
  a picked run that repeats another trains that one, once."""
  picked = []
  monkeypatch.setattr(study, "_run_all", lambda todo, root, jobs: picked.extend(todo))
  monkeypatch.setattr(study, "tokenizer_path", lambda root: "unused.model")
  monkeypatch.setattr(study_report, "write", lambda *a: None)
  study.main(["--root", str(tmp_path), "--only=rope"])
  assert sorted(r["id"] for r in picked) == [
      f"rope/L32_p8_v256/taipan_rope/seed{s}" for s in study.SEEDS]
  picked.clear()
  study.main(["--root", str(tmp_path), "--only=rope,extrapolation", "--seeds=2"])
  assert {r["id"] for r in picked} == (
      {"rope/L32_p8_v256/taipan_rope/seed2"}
      | {f"extrapolation/stdlib/{a}/seed2" for a in study.ARCHS})
  picked.clear()
  study.main(["--root", str(tmp_path), "--settings=L64_p8", "--only=rope,capacity",
              "--seeds=1"])
  assert {r["id"] for r in picked} == {f"{g}/L64_p8/{a}/seed1" for g, a in (
      ("rope", "taipan_rope"), *(("capacity", c) for c in study.CAPACITY_ARCHS))}
  picked.clear()
  # The warm-up group's baseline is the extrapolation group's Taipan: trained there.
  study.main(["--root", str(tmp_path), "--only=warmup", "--seeds=2"])
  assert sorted(r["id"] for r in picked) == [
      "extrapolation/stdlib/taipan/seed2", f"warmup/stdlib/{study.TEXT_WARMUP}/seed2"]
  picked.clear()
  study.main(["--root", str(tmp_path), "--settings=L64_p8_far", "--models=mamba2",
              "--seeds=0"])
  assert [r["id"] for r in picked] == ["recall/L64_p8/mamba2/seed0"]


@pytest.mark.parametrize("far, near", [("L64_p8_far", "L64_p8"),
                                       ("L32_p8_v256_far", "L32_p8_v256")])
def test_far_settings_window_reaches_few_queries_pairs(far, near):
  """The far controls' SAL window reaches the pair (key or value token) of about 5% of the
  queries, the first few of a row; the near setting's window reaches every one."""
  from taipan_jax.data.synthetic import mqar_example
  settings = study.RECALL

  def reached(data, rows=300):
    hit = total = 0
    for index in range(rows):
      ex = mqar_example(0, index, seq_len=data["data.seq_len"],
                        num_kv_pairs=data["data.num_kv_pairs"],
                        vocab_size=data.get("model.vocab_size", study.BASE["model.vocab_size"]))
      tokens, window = np.asarray(ex["tokens"]), data["sal.window"]
      pair_keys = tokens[:2 * data["data.num_kv_pairs"]:2]
      for q in np.flatnonzero(ex["loss_mask"]):
        i = int(np.flatnonzero(pair_keys == tokens[q])[0])
        hit += 2 * i + 1 > q - window         # the value (hence the key) token in q's window
        total += 1
    return hit / total
  assert 0.02 < reached(settings[far]) < 0.08
  assert reached(settings[near]) == 1.0
