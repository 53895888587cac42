"""`validate`: every field checked once, before any work, each failure one line naming the key,
the value and the fix (MaxText's pyconfig habit)."""
from __future__ import annotations

import ml_collections

from taipan_jax.config.axes import MESH_AXES, RulesError, parse_rules
from taipan_jax.config.errors import ConfigError, fail as _fail
from taipan_jax.config.sizes import layer_kinds
from taipan_jax.configs import base as _base

LAYER_KINDS = {"m": "Mamba-2 block", "s": "Selective Attention Layer", "a": "attention block"}
DTYPES = ("float32", "bfloat16", "float16")
INFERENCE_SELECTIONS = ("positional_gumbel", "sign", "window_rank", "window_expected",
                        "none", "all")


def _check_schema(cfg, schema, prefix=""):
  for key in cfg.keys():
    full = f"{prefix}{key}"
    value = cfg[key]
    if key not in schema:
      _fail(full, value, "unknown key", f"remove it or use one of {sorted(schema.keys())}")
    expected = schema[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        _fail(full, value, "expected a section", "assign fields inside it instead")
      _check_schema(value, expected, full + ".")
      continue
    want = schema.get_type(key) if hasattr(schema, "get_type") else type(expected)
    if value is None:
      continue
    if want is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if want is not type(None) and not isinstance(value, want):
      _fail(full, value, f"expected {want.__name__}, got {type(value).__name__}",
            f"give a {want.__name__}")


# The vocabulary of ops/dispatch.py (tests/test_config.py holds the two equal): config sits
# below ops and imports nothing of them.
KERNELS = ("auto", "xla", "pallas")
_RENAMED_KERNELS = {"reference": "'xla'", "interpret": "'pallas' with {section}.interpret=True"}


def _check_kernel(section: str, node) -> None:
  if node.kernel in _RENAMED_KERNELS:
    _fail(f"{section}.kernel", node.kernel, "is the old spelling",
          "use " + _RENAMED_KERNELS[node.kernel].format(section=section))
  if node.kernel not in KERNELS:
    _fail(f"{section}.kernel", node.kernel, "unknown implementation", f"use one of {KERNELS}")
  if node.interpret and node.kernel == "xla":
    _fail(f"{section}.interpret", node.interpret, f"{section}.kernel='xla' runs no kernel",
          f"set {section}.kernel='pallas' (or 'auto') to interpret the kernels")


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field once; returns the same config, locked against new keys."""
  _check_schema(cfg, _base.get_config())
  pattern = cfg.model.pattern
  _check_model(cfg)
  if "m" in pattern:
    _check_mamba(cfg)
  if "s" in pattern:
    _check_sal(cfg)
  if "a" in pattern:
    _check_attention(cfg)
  _check_optim(cfg)
  _check_train(cfg)
  _check_data(cfg)
  _check_mesh(cfg)
  cfg.lock()
  return cfg


def _positive(key, value):
  if value is None or value <= 0:
    _fail(key, value, "must be > 0", "set a positive value")


def _check_model(cfg):
  m = cfg.model
  for key in ("vocab_size", "d_model", "num_units", "pad_vocab_multiple", "norm_eps"):
    _positive(f"model.{key}", m[key])
  if not m.pattern or set(m.pattern) - set(LAYER_KINDS):
    _fail("model.pattern", m.pattern, f"characters must be from {LAYER_KINDS}",
          "write e.g. 'mmmmmms'")
  for key in ("dtype", "param_dtype"):
    if m[key] not in DTYPES:
      _fail(f"model.{key}", m[key], "unknown dtype", f"use one of {DTYPES}")
  if m.mlp_hidden < 0:
    _fail("model.mlp_hidden", m.mlp_hidden, "must be >= 0", "0 picks 8/3*d_model rounded to 128")


def _check_mamba(cfg):
  m, mb = cfg.model, cfg.mamba
  for key in ("d_state", "d_conv", "expand", "head_dim", "n_groups", "chunk_size"):
    _positive(f"mamba.{key}", mb[key])
  d_inner = mb.expand * m.d_model
  if d_inner % mb.head_dim:
    _fail("mamba.head_dim", mb.head_dim,
          f"does not divide d_inner = expand*d_model = {d_inner}", "pick a divisor of d_inner")
  heads = d_inner // mb.head_dim
  if heads % mb.n_groups:
    _fail("mamba.n_groups", mb.n_groups, f"does not divide the {heads} SSM heads",
          "pick a divisor of the head count")
  if not 0 < mb.a_init_min <= mb.a_init_max:
    _fail("mamba.a_init_min", mb.a_init_min, f"need 0 < a_init_min <= a_init_max "
          f"({mb.a_init_max})", "use the default range (1, 16)")
  if not 0 < mb.dt_min <= mb.dt_max:
    _fail("mamba.dt_min", mb.dt_min, f"need 0 < dt_min <= dt_max ({mb.dt_max})",
          "use the defaults 1e-3 and 0.1")
  _positive("mamba.dt_init_floor", mb.dt_init_floor)
  _check_kernel("mamba", mb)
  if (mb.kernel == "pallas" or mb.interpret) and mb.chunk_size % 8:
    _fail("mamba.chunk_size", mb.chunk_size, "the Pallas SSD kernel needs a multiple of 8",
          "use e.g. 256")


def _check_sal(cfg):
  m, sal = cfg.model, cfg.sal
  _positive("sal.head_dim", sal.head_dim)
  if m.d_model % sal.head_dim:
    _fail("sal.head_dim", sal.head_dim, f"does not divide d_model = {m.d_model}",
          "pick a divisor of d_model")
  _positive("sal.window", sal.window)
  if not 0.0 < sal.capacity <= 1.0:
    _fail("sal.capacity", sal.capacity, "must be in (0, 1]", "the paper uses 0.15")
  _positive("sal.tau", sal.tau)
  if sal.tau_final is not None:
    _positive("sal.tau_final", sal.tau_final)
  if sal.dense_warmup_steps < 0:
    _fail("sal.dense_warmup_steps", sal.dense_warmup_steps, "must be >= 0",
          "0 trains as the paper does (no warm-up)")
  if sal.dense_warmup_steps and sal.selection == "all":
    _fail("sal.dense_warmup_steps", sal.dense_warmup_steps, "does nothing when "
          "sal.selection='all' selects every token", "set it to 0")
  if sal.gate_hidden < 0:
    _fail("sal.gate_hidden", sal.gate_hidden, "must be >= 0", "0 is a single Dense gate")
  if sal.selection not in ("gumbel", "all"):
    _fail("sal.selection", sal.selection, "unknown selection", "use 'gumbel' or 'all'")
  if sal.straight_through not in ("zero", "attention"):
    _fail("sal.straight_through", sal.straight_through, "unknown estimator",
          "use 'zero' (attention for the selected rows only) or 'attention' (every row)")
  if sal.inference_selection not in INFERENCE_SELECTIONS:
    _fail("sal.inference_selection", sal.inference_selection, "unknown rule",
          f"use one of {INFERENCE_SELECTIONS}")
  if sal.rope and sal.head_dim % 2:
    _fail("sal.head_dim", sal.head_dim, "RoPE needs an even head_dim", "use an even value")
  _check_kernel("sal", sal)
  if sal.inference_capacity is not None:
    if not 1 <= sal.inference_capacity <= sal.window:
      _fail("sal.inference_capacity", sal.inference_capacity, "must be in [1, window]",
            "leave it unset for no cap")


def _check_attention(cfg):
  m, att = cfg.model, cfg.attention
  _positive("attention.head_dim", att.head_dim)
  if m.d_model % att.head_dim or att.head_dim % 2:
    _fail("attention.head_dim", att.head_dim,
          f"must be even and divide d_model = {m.d_model}", "use e.g. 64")
  _positive("attention.rope_theta", att.rope_theta)
  _positive("attention.max_cache_len", att.max_cache_len)


def _check_optim(cfg):
  if cfg.loss.budget_weight < 0:
    _fail("loss.budget_weight", cfg.loss.budget_weight, "must be >= 0", "the paper uses 1.0")
  if cfg.loss.ce_chunk < 0:
    _fail("loss.ce_chunk", cfg.loss.ce_chunk, "must be >= 0",
          "0 for the unfused head, else sequence positions per step such as 512")
  o = cfg.optim
  for key in ("peak_lr", "eps"):
    _positive(f"optim.{key}", o[key])
  if o.final_lr < 0 or o.final_lr > o.peak_lr:
    _fail("optim.final_lr", o.final_lr, f"must be in [0, peak_lr={o.peak_lr}]", "e.g. 1e-5")
  if o.warmup_steps < 0:
    _fail("optim.warmup_steps", o.warmup_steps, "must be >= 0", "e.g. 2000")
  for key in ("b1", "b2"):
    if not 0 <= o[key] < 1:
      _fail(f"optim.{key}", o[key], "must be in [0, 1)", "the paper uses 0.9 / 0.95")
  if o.weight_decay < 0:
    _fail("optim.weight_decay", o.weight_decay, "must be >= 0", "the paper uses 0.01")
  if o.grad_clip < 0:
    _fail("optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables)", "the paper uses 1.0")


def _check_train(cfg):
  t = cfg.train
  for key in ("steps", "batch_size", "log_every", "grad_accum_steps", "eval_batches",
              "keep_checkpoints", "max_nonfinite_steps"):
    _positive(f"train.{key}", t[key])
  for key in ("eval_every", "checkpoint_every"):
    if t[key] < 0:
      _fail(f"train.{key}", t[key], "must be >= 0 (0: only at the end)", "e.g. 1000")
  if not 0.0 < t.selection_gap_warning <= 1.0:
    _fail("train.selection_gap_warning", t.selection_gap_warning, "must be in (0, 1]",
          "e.g. 0.05 (1.0 never warns)")
  if t.batch_size % t.grad_accum_steps:
    _fail("train.batch_size", t.batch_size, f"is not a multiple of train.grad_accum_steps="
          f"{t.grad_accum_steps}", "make batch_size a multiple of the micro-batch count")


def _check_data(cfg):
  m = cfg.model
  d = cfg.data
  _positive("data.seq_len", d.seq_len)
  if d.task not in ("mqar", "copy", "text"):
    _fail("data.task", d.task, "unknown task", "use 'mqar', 'copy' or 'text'")
  if d.task == "mqar":
    _positive("data.num_kv_pairs", d.num_kv_pairs)
    if d.seq_len < 4 * d.num_kv_pairs:
      _fail("data.seq_len", d.seq_len, f"MQAR with {d.num_kv_pairs} pairs needs at least "
            f"{4 * d.num_kv_pairs} tokens (pairs, then one query per pair)",
            "raise seq_len or lower data.num_kv_pairs")
    if m.vocab_size < 2 * d.num_kv_pairs + 2:
      _fail("model.vocab_size", m.vocab_size, f"MQAR with {d.num_kv_pairs} pairs needs at "
            f"least {2 * d.num_kv_pairs + 2} tokens", "raise vocab_size or lower num_kv_pairs")
    slots = (d.seq_len - 2 * d.num_kv_pairs) // 2
    if not 0 <= d.num_queries <= slots:
      _fail("data.num_queries", d.num_queries, f"must be in [0, {slots}]: {d.seq_len} tokens "
            f"after {d.num_kv_pairs} pairs hold {slots} query slots",
            "lower it, or raise data.seq_len (0: a query in every slot)")
  if d.task == "copy":
    if d.seq_len < 3:
      _fail("data.seq_len", d.seq_len, "the copy task needs at least 3 tokens", "raise it")
    if m.vocab_size < 3:
      _fail("model.vocab_size", m.vocab_size, "the copy task needs at least 3 tokens", "raise it")
  if d.task == "text":
    for key in ("path", "tokenizer"):
      if not d[key]:
        _fail(f"data.{key}", d[key], "is empty but data.task='text' needs it",
              f"set --config.data.{key}=...")
  if not 0.0 <= d.eval_fraction < 1.0:
    _fail("data.eval_fraction", d.eval_fraction, "must be in [0, 1)", "e.g. 0.01")
  if d.num_workers < 0:
    _fail("data.num_workers", d.num_workers, "must be >= 0", "0 reads in the main process")
  _positive("data.read_threads", d.read_threads)


def _check_mesh(cfg):
  for axis in MESH_AXES:
    if cfg.mesh[axis] == 0 or cfg.mesh[axis] < -1:
      _fail(f"mesh.{axis}", cfg.mesh[axis], "must be >= 1, or -1 for the devices left",
            "set a positive size")
  if sum(cfg.mesh[a] == -1 for a in MESH_AXES) > 1:
    _fail("mesh.data", cfg.mesh.data, "more than one mesh axis is -1",
          "give all but one of them a size")
  _positive("mesh.dcn_data", cfg.mesh.dcn_data)
  if cfg.mesh.sequence != 1:
    _check_context_parallel(cfg)
  try:
    parse_rules(cfg.sharding.rules)
  except RulesError as e:
    raise ConfigError(str(e)) from None


def _check_context_parallel(cfg) -> None:
  """mesh.sequence > 1 splits every row's length over that many devices (training and
  evaluation); each device's stretch must hold the halo its layers read."""
  n, l = cfg.mesh.sequence, cfg.data.seq_len
  kinds = layer_kinds(cfg)
  if n < 1:
    _fail("mesh.sequence", n, "needs an explicit size for context parallelism",
          "set it to the number of devices each row's length is split over")
  if "a" in kinds:
    _fail("mesh.sequence", n, f"model.pattern={cfg.model.pattern!r} has full attention, which "
          "context parallelism does not split", "leave mesh.sequence at 1 for this model")
  if l % n:
    _fail("mesh.sequence", n, f"does not divide data.seq_len={l}",
          f"a data.seq_len divisible by {n}")
  halo = max(cfg.mamba.d_conv - 1, cfg.sal.window - 1 if "s" in kinds else 0)
  if l // n < halo:
    _fail("mesh.sequence", n, f"leaves {l // n} tokens of each row per device, fewer than the "
          f"{halo} the previous device hands over (sal.window - 1)",
          f"at most {max(l // max(halo, 1), 1)} devices on the sequence axis, or a longer "
          "data.seq_len")
  if cfg.sal.inference_capacity is not None:
    _fail("sal.inference_capacity", cfg.sal.inference_capacity, "counts selections over each "
          "window, which context parallelism does not carry across devices",
          "leave it None with mesh.sequence > 1")
