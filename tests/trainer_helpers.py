"""Small runs of the `taipan` CLI and readers of what they leave in a workdir."""
import json
import os
import subprocess
import sys

# A 2-layer model on 16-token MQAR: compiles and steps in seconds on the CPU.
SMALL = ["--config.model.pattern=ms", "--config.model.num_units=1",
         "--config.data.seq_len=16", "--config.data.num_kv_pairs=2",
         "--config.train.batch_size=8", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.eval_batches=1",
         "--config.optim.warmup_steps=2"]


def taipan(*args, timeout=300, env=None, **popen):
  """Runs `python -m taipan_jax.cli <args>` (in this environment, or `env`); returns the
  CompletedProcess."""
  return subprocess.run([sys.executable, "-m", "taipan_jax.cli", *args], capture_output=True,
                        text=True, env=os.environ.copy() if env is None else env,
                        timeout=timeout, **popen)


def optimizing_env():
  """This environment with XLA's default optimizations back on (conftest turns some off on
  the CPU to compile faster): for a child process that spends its time running programs."""
  env = os.environ.copy()
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_cpu_use_fusion_emitters=false", "").strip()
  return env


def start_taipan(*args):
  return subprocess.Popen([sys.executable, "-m", "taipan_jax.cli", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=os.environ.copy())


def metric_rows(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip().endswith("}")]


def losses(workdir) -> dict:
  """{step: loss} of the train rows (the last row per step)."""
  return {r["step"]: r["loss"] for r in metric_rows(workdir) if "loss" in r}
