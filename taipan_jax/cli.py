r"""The `taipan` command: thin subcommands that parse, validate once, and call the library.

    taipan train --config=configs/tiny.py --workdir=/tmp/tiny [--config.train.steps=300]
    taipan eval --workdir=/tmp/tiny [--data=path/or/glob]
    taipan eval --workdir=/tmp/run --long_context --data=book.txt --max_tokens=1048576
    taipan generate --workdir=/tmp/run --prompt="def main(" [--temperature=0.8 --top_p=0.95]
    taipan tokenizer train --input='corpus/**/*.txt' --vocab_size=8192 --output=/tmp/spm
    taipan convert --hf_dir=path/to/mamba2 --workdir=/tmp/m2 [--upcycle_sal_every=6]
    taipan compile --config=taipan_190m --topology=v5e:4x4 [--step=train] [--out=r.json]

A bad input stops with one line `taipan: error: ...` naming the value and the fix, and a
non-zero exit, before any file is written. `taipan --help` and `taipan <command> --help`
answer without importing jax (taipan_jax imports it lazily).
"""
from __future__ import annotations

import os
import sys

from absl import flags, logging

from taipan_jax.cli_usage import Command, UsageError, closest, command_help, overview, \
    parse_command

_CONFIG = flags.DEFINE_string(
    "config", "tiny", "Config file with get_config(), or a bundled config's name; override "
    "fields with --config.a.b=value (parsed by taipan_jax.config, typed by configs/base.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard files; a "
                               "run resumes from here by itself.")
_DATA = flags.DEFINE_string("data", None, "eval: a file, directory or glob to evaluate on "
                            "instead of the run's held-out documents.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "eval: batches to evaluate.")
_LONG = flags.DEFINE_bool("long_context", False, "eval: stream one long document (--data) "
                          "through the model in segments carrying the cache; perplexity per "
                          "position bucket to JSON and PNG.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 1 << 20, "eval --long_context: tokens of "
                                   "the document to evaluate (it is cut there).")
_SEGMENT = flags.DEFINE_integer("segment_len", 16384, "eval --long_context: tokens per "
                                "forward call; compile --step=long_context: the segment.")
_FIRST_BUCKET = flags.DEFINE_integer("first_bucket", 1024, "eval --long_context: the first "
                                     "position bucket's size; each next one doubles.")
_FRESH = flags.DEFINE_list("fresh_starts", [], "eval --long_context: positions from which the "
                          "document is streamed again from an empty cache, to tell a bucket's "
                          "position from its text (long_context.fresh_start_control).")
_OUT = flags.DEFINE_string("out", None, "eval --long_context: output stem for .json/.png "
                           "(default <workdir>/long_context/<data name>); compile: the "
                           "report's JSON file.")
_PROMPT = flags.DEFINE_string("prompt", None, "generate: text to continue (text models).")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", None, "generate: comma-separated token ids "
                                  "instead of --prompt (any model).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "generate: tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "generate: keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: nucleus mass (1.0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
_INPUT = flags.DEFINE_string("input", None, "tokenizer: text to train on (file, dir or glob).")
_OUTPUT = flags.DEFINE_string("output", None, "tokenizer: output prefix (writes .model/.vocab).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "tokenizer: replace an existing "
                               "<output>.model (workdirs trained with it keep their own copy).")
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "tokenizer: pieces in the vocabulary.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "tokenizer: algorithm.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "tokenizer: text field of .jsonl records.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "convert: a Hugging Face / state-spaces Mamba-2 "
                              "checkpoint directory (config.json + safetensors).")
_UPCYCLE = flags.DEFINE_integer("upcycle_sal_every", 0, "convert: 0 keeps the Mamba-2; K > 0 "
                                "grows a Taipan with a fresh SAL after every K blocks.")
_PROFILE = flags.DEFINE_string("profile_steps", None, "train: a:b traces steps a..b with "
                               "jax.profiler into <workdir>/profile/ (open it in TensorBoard).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "compile: the TPU slice, e.g. v5e:4x4, "
                                "v5p:4x4x4, v6e:2x2 (libtpu describes it; no TPU needed).")
_CHIP_CONFIG = flags.DEFINE_enum("chip_config", "default", ["default", "megacore"],
                                 "compile: libtpu's chip configuration.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "compile: slices joined over DCN "
                                   "(set --config.mesh.dcn_data to match).")
_STEP = flags.DEFINE_enum("step", "train", ["train", "eval", "long_context"], "compile: the "
                          "training step, the eval step, or one --segment_len segment of "
                          "`eval --long_context` split over every chip.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' when the environment names a multi-process "
    "job (JAX_COORDINATOR_ADDRESS, SLURM, multi-host TPU).")


def _fail(message: str) -> None:
  print(f"taipan: error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _maybe_initialize_distributed() -> None:
  import jax
  multi = ("JAX_COORDINATOR_ADDRESS" in os.environ
           or int(os.environ.get("SLURM_NTASKS", "1")) > 1
           or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
  if _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and multi):
    # A plain multi-process launch names the job by environment (docs/scaling.md); cluster
    # managers (SLURM, TPU pods) are detected by jax itself.
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=int(count) if count else None,
                               process_id=int(index) if index else None)


_overrides: list[str] = []     # the --config.a.b=v arguments, taken out before absl parses

# Config fields a command that reads a trained workdir may change: how the model is computed
# and read, never what it is (the checkpoint fixes that).
_READ_OVERRIDES = ("mamba.kernel", "sal.kernel", "sal.inference_selection",
                   "sal.inference_capacity", "attention.max_cache_len", "data.tokenizer")
_EVAL_OVERRIDES = _READ_OVERRIDES + ("data.text_field",)


def _read_overrides(command: str, allowed: tuple[str, ...]) -> dict:
  from taipan_jax.config import parse_overrides
  parsed = parse_overrides(_overrides)
  for key in parsed:
    if key not in allowed:
      raise UsageError(f"--config.{key} does not apply to `taipan {command}`: the model and "
                       "its recipe come from the workdir; fix: leave it out (this command "
                       f"accepts --config. of {', '.join(allowed)})")
  return parsed


def _profile_steps():
  if not _PROFILE.value:
    return None
  first, sep, last = _PROFILE.value.partition(":")
  try:
    first, last = int(first), int(last)
  except ValueError:
    first = last = -1
  if not sep or not 1 <= first <= last:
    raise UsageError(f"--profile_steps={_PROFILE.value!r} is not a:b with 1 <= a <= b; fix: "
                     "e.g. --profile_steps=10:15 (after the first step, which compiles)")
  return first, last


def _train(argv):
  from taipan_jax.config import load_config, parse_overrides
  from taipan_jax.training.loop import train
  if not _WORKDIR.value:
    raise UsageError("train needs --workdir for its checkpoints, metrics and config; fix: "
                     "add --workdir=<a new or empty directory, or a run's own to resume it>")
  profile = _profile_steps()
  cfg = load_config(_CONFIG.value, parse_overrides(_overrides))
  _maybe_initialize_distributed()
  train(cfg, _WORKDIR.value, profile_steps=profile)


def _eval(argv):
  from taipan_jax.training.loop import evaluate_workdir
  if not _WORKDIR.value:
    raise UsageError("eval needs --workdir (the directory `taipan train` wrote)")
  overrides = _read_overrides("eval", _EVAL_OVERRIDES)
  if _LONG.value:
    _eval_long_context(overrides)
    return
  _maybe_initialize_distributed()
  evaluate_workdir(_WORKDIR.value, data_path=_DATA.value, batches=_EVAL_BATCHES.value,
                   overrides=overrides)


def _eval_long_context(overrides):
  import time
  import numpy as np
  from taipan_jax.data.text import read_document_tokens
  from taipan_jax.inference import long_context
  from taipan_jax.inference.load import load_workdir
  if not _DATA.value:
    raise UsageError("eval --long_context needs --data=<text file, or a glob of files read as "
                     "one document, or a .npy of token ids>")
  if _MAX_TOKENS.value < 2 or _SEGMENT.value < 1:
    raise UsageError(f"--max_tokens={_MAX_TOKENS.value} must be >= 2 and --segment_len="
                     f"{_SEGMENT.value} >= 1")
  try:
    fresh_starts = [int(v) for v in _FRESH.value]
  except ValueError:
    raise UsageError(f"--fresh_starts={','.join(_FRESH.value)} must be token positions "
                     "(integers), e.g. --fresh_starts=262144,524288") from None
  try:
    import matplotlib  # noqa: F401  -- checked before minutes of evaluation, not after
  except ImportError:
    raise UsageError("eval --long_context writes a PNG and needs matplotlib; fix: pip install "
                     "'taipan-jax[plot]'") from None
  loaded = load_workdir(_WORKDIR.value, overrides)
  tokens = read_document_tokens(_DATA.value, loaded.tokenizer, _MAX_TOKENS.value)
  if any(not 0 < s < tokens.size - 1 for s in fresh_starts):   # before the stream, not after
    raise UsageError(f"--fresh_starts={','.join(_FRESH.value)}: the document has only "
                     f"{tokens.size:,} tokens; use positions 1 .. {tokens.size - 2}")
  print(f"{_DATA.value}: {tokens.size:,} tokens, step {loaded.step}, segments of "
        f"{_SEGMENT.value:,}", flush=True)
  start = time.perf_counter()
  nll = long_context.stream_nll(loaded.model, tokens, segment_len=_SEGMENT.value)
  seconds = time.perf_counter() - start
  rows = long_context.bucket_table(nll, first=_FIRST_BUCKET.value)
  print(f"{'positions':>22} {'tokens':>10} {'ppl':>9}")
  for r in rows:
    print(f"{r['from']:>10,} - {r['to']:<10,} {r['tokens']:>10,} {r['ppl']:>9.3f}")
  control = long_context.fresh_start_control(loaded.model, tokens, nll, fresh_starts,
                                             segment_len=_SEGMENT.value)
  for r in control:
    print(f"targets {r['from']:>10,} - {r['to']:<10,} ppl streamed from 0 "
          f"{r['ppl_streamed']:8.3f}, from an empty cache at {r['start']:,} "
          f"{r['ppl_fresh_cache']:8.3f}")
  base = os.path.basename(_DATA.value.rstrip("/"))
  if any(c in base for c in "*?["):          # a glob: named after its directory
    base = os.path.basename(os.path.dirname(_DATA.value.rstrip("/")))
  name = os.path.splitext(base)[0] or "document"
  stem = _OUT.value or os.path.join(_WORKDIR.value, "long_context", name)
  train_len = loaded.cfg.data.seq_len
  meta = {"workdir": os.path.abspath(_WORKDIR.value), "step": loaded.step,
          "data": _DATA.value, "tokens": int(tokens.size), "segment_len": _SEGMENT.value,
          "train_seq_len": train_len, "seconds": seconds,
          "tokens_per_second": tokens.size / seconds, "overall_ppl": float(np.exp(nll.mean())),
          **({"fresh_starts": control} if control else {})}
  paths = long_context.write_report(
      rows, stem, meta=meta, train_len=train_len,
      title=f"{loaded.cfg.model.pattern} x {loaded.cfg.model.num_units}, step {loaded.step}: "
            f"{tokens.size:,} tokens of {name}")
  print(f"{tokens.size:,} tokens in {seconds:.1f}s; wrote {paths[0]} and {paths[1]}")


def _generate(argv):
  import numpy as np
  from taipan_jax.inference import Generator, Sampling
  from taipan_jax.inference.load import load_workdir
  if not _WORKDIR.value:
    raise UsageError("generate needs --workdir (the directory `taipan train` wrote)")
  if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
    raise UsageError("generate needs exactly one of --prompt=<text> or --prompt_ids=1,2,3")
  overrides = _read_overrides("generate", _READ_OVERRIDES)
  sampling = Sampling(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  loaded = load_workdir(_WORKDIR.value, overrides)
  if _PROMPT.value is not None:
    if loaded.tokenizer is None:
      raise UsageError(f"{_WORKDIR.value} holds a {loaded.cfg.data.task!r} model with no "
                       "tokenizer; fix: pass --prompt_ids=...")
    ids = loaded.tokenizer.EncodeAsIds(_PROMPT.value)
  else:
    try:
      ids = [int(t) for t in _PROMPT_IDS.value.split(",") if t.strip()]
    except ValueError:
      raise UsageError(f"--prompt_ids={_PROMPT_IDS.value!r} is not comma-separated "
                       "integers") from None
  gen = Generator(loaded.model)
  stop = [loaded.tokenizer.eos_id()] if loaded.tokenizer is not None else []
  emitted = []
  for new in gen.stream([np.asarray(ids, np.int32)], max_new_tokens=_MAX_NEW.value,
                        sampling=sampling, stop_tokens=stop, seed=_SEED.value):
    if loaded.tokenizer is None:
      if new[0]:
        print(",".join(map(str, new[0])), end=",", flush=True)
      continue
    # Decode the whole continuation each time: pieces join differently than one by one.
    before = loaded.tokenizer.DecodeIds(emitted)
    emitted += new[0]
    print(loaded.tokenizer.DecodeIds(emitted)[len(before):], end="", flush=True)
  print()


def _tokenizer(argv):
  from taipan_jax.data.text import TextDocuments
  from taipan_jax.data.tokenizer import train_tokenizer
  if not _INPUT.value or not _OUTPUT.value:
    raise UsageError("tokenizer train needs --input=<file, dir or glob> and --output=<prefix>")
  existing = [_OUTPUT.value + ext for ext in (".model", ".vocab")
              if os.path.exists(_OUTPUT.value + ext)]
  if existing and not _OVERWRITE.value:     # checked before reading any text
    raise UsageError(f"--output={_OUTPUT.value!r}: {existing[0]} exists (runs may point at it);"
                     " fix: pick another --output, or pass --overwrite to replace it")
  docs = TextDocuments(_INPUT.value, _TEXT_FIELD.value)
  path = train_tokenizer((docs[i] for i in range(len(docs))), _OUTPUT.value,
                         vocab_size=_VOCAB.value, model_type=_MODEL_TYPE.value,
                         overwrite=_OVERWRITE.value)
  print(f"wrote {path} ({_VOCAB.value} pieces, {_MODEL_TYPE.value}, byte fallback) from "
        f"{len(docs)} documents; train with --config.data.tokenizer={path} "
        f"--config.model.vocab_size={_VOCAB.value}")


def _convert(argv):
  from taipan_jax.interop import load_hf_mamba2, upcycle_to_taipan
  from taipan_jax.interop.convert import save_workdir
  if not _HF_DIR.value or not _WORKDIR.value:
    raise UsageError("convert needs --hf_dir=<checkpoint directory> and --workdir=<output>")
  model, cfg = load_hf_mamba2(_HF_DIR.value)
  if _UPCYCLE.value:
    model, cfg = upcycle_to_taipan(model, cfg, sal_every=_UPCYCLE.value)
  path = save_workdir(model, cfg, _WORKDIR.value)
  print(f"wrote {_WORKDIR.value} ({cfg.model.pattern} x {cfg.model.num_units}); fine-tune with "
        f"`taipan train --config={path} --workdir={_WORKDIR.value} --config.data...`")


def _compile(argv):
  import json
  from taipan_jax.config import load_config, parse_overrides
  from taipan_jax.training import aot_compile
  if not _TOPOLOGY.value:
    raise UsageError("compile needs --topology=<generation>:<chips per axis>, e.g. v5e:4x4")
  cfg = load_config(_CONFIG.value, parse_overrides(_overrides))
  try:
    report = aot_compile.compile_for_topology(
        cfg, _TOPOLOGY.value, chip_config=_CHIP_CONFIG.value, num_slices=_NUM_SLICES.value,
        step=_STEP.value, segment_len=_SEGMENT.value)
  except aot_compile.AotCompileError as e:
    raise UsageError(str(e)) from None
  print(aot_compile.format_report(report), flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {_OUT.value}")
  if not report["fits"]:
    print(f"taipan: error: {aot_compile.does_not_fit(report)}", file=sys.stderr, flush=True)
    sys.exit(1)


_COMMANDS = {
    "train": Command(
        _train, "taipan train --workdir=W [--config=C] [--config.a.b=v ...]",
        "train a model; resumes from W by itself",
        ("config", "workdir", "profile_steps", "distributed"),
        ["taipan train --config=tiny --workdir=/tmp/tiny",
         "taipan train --workdir=/tmp/tiny --config.train.steps 300",
         "taipan train --config=configs/taipan_190m.py --workdir=runs/190m "
         "--config.data.task=text --config.data.path='corpus/*.txt' "
         "--config.data.tokenizer=spm.model",
         "taipan train --workdir=/tmp/tiny --flagfile=overrides.flags"]),
    "eval": Command(
        _eval, "taipan eval --workdir=W [--data=PATH] [--long_context ...]",
        "evaluate the newest checkpoint (held-out data, a file, or one long document)",
        ("workdir", "data", "eval_batches", "long_context", "max_tokens", "segment_len",
         "first_bucket", "fresh_starts", "out", "distributed"),
        ["taipan eval --workdir=/tmp/tiny",
         "taipan eval --workdir=runs/190m --data='held_out/*.txt'",
         "taipan eval --workdir=runs/190m --long_context --data=book.txt"],
        config_fields=_EVAL_OVERRIDES),
    "generate": Command(
        _generate, "taipan generate --workdir=W (--prompt=TEXT | --prompt_ids=1,2,3)",
        "stream generated text from the newest checkpoint",
        ("workdir", "prompt", "prompt_ids", "max_new_tokens", "temperature", "top_k",
         "top_p", "seed"),
        ["taipan generate --workdir=runs/190m --prompt='Once upon a time'",
         "taipan generate --workdir=/tmp/tiny --prompt_ids=3,17,4 --max_new_tokens=8",
         "taipan generate --workdir=runs/190m --prompt=hi --config.sal.kernel=xla"],
        config_fields=_READ_OVERRIDES),
    "tokenizer": Command(
        _tokenizer, "taipan tokenizer train --input=PATH --output=PREFIX [--vocab_size=V]",
        "train a byte-fallback SentencePiece tokenizer",
        ("input", "output", "overwrite", "vocab_size", "model_type", "text_field"),
        ["taipan tokenizer train --input='corpus/**/*.txt' --vocab_size=8192 "
         "--output=/tmp/spm"], positional=("train",), config_fields=()),
    "convert": Command(
        _convert, "taipan convert --hf_dir=D --workdir=W [--upcycle_sal_every=K]",
        "a Hugging Face / state-spaces Mamba-2 checkpoint as a workdir",
        ("hf_dir", "workdir", "upcycle_sal_every"),
        ["taipan convert --hf_dir=path/to/mamba2-130m --workdir=/tmp/m2",
         "taipan convert --hf_dir=path/to/mamba2-130m --workdir=/tmp/t --upcycle_sal_every=6"],
        config_fields=()),
    "compile": Command(
        _compile, "taipan compile --topology=T [--config=C] [--step=train|eval|long_context]",
        "compile a step for a TPU slice on any machine; memory per chip, cost, fits or not",
        ("config", "topology", "chip_config", "num_slices", "step", "segment_len", "out"),
        ["taipan compile --config=taipan_190m --topology=v5e:4x4 "
         "--config.model.dtype=bfloat16 --config.train.grad_accum_steps=8",
         "taipan compile --config=tiny --topology=v5p:2x2x1 --step=eval --out=r.json",
         "taipan compile --config=taipan_190m --topology=v5e:2x4 --step=long_context "
         "--segment_len=131072"]),
}
def _parse(name: str, prog: str, args: list[str]) -> list[str]:
  """Parses a command's flags into absl's FLAGS and its overrides into _overrides; returns
  its positional arguments."""
  _overrides[:], positional = parse_command(_COMMANDS, name, prog, args)
  return positional


def _set_verbosity() -> None:
  # orbax and grain log every save and read at INFO; progress lines are ours. -v/--verbosity
  # turns their logs back on.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _errors():
  from taipan_jax.config import ConfigError
  from taipan_jax.data.errors import DataError
  from taipan_jax.inference import GenerationError
  from taipan_jax.interop import InteropError
  from taipan_jax.training.checkpoint import CheckpointError
  from taipan_jax.training.loop import TrainingError
  from taipan_jax.training.workdir import WorkdirError
  return (ConfigError, DataError, TrainingError, CheckpointError, UsageError, InteropError,
          FileExistsError, GenerationError, WorkdirError)


def _enable_compilation_cache() -> None:
  """A persistent XLA compilation cache, on unless the user set one (or TAIPAN_NO_CACHE=1):
  a second `taipan generate` or a resumed run skips compiling what the first one did."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get("TAIPAN_NO_CACHE") == "1":
    return
  import jax
  directory = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                           "taipan_jax", "xla")
  jax.config.update("jax_compilation_cache_dir", directory)
  # Small models compile many programs of well under jax's default 1 s threshold, which
  # together take most of a short command's time.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def main(argv=None):
  """`taipan <command> [flags]`; argv defaults to sys.argv (callable again in-process)."""
  argv = list(sys.argv if argv is None else argv)
  flags.FLAGS.unparse_flags()
  first = argv[1] if len(argv) > 1 else "help"
  if first in ("help", "-h", "--help", "-help", "--helpfull"):
    topic = argv[2] if len(argv) > 2 else None
    print(command_help(_COMMANDS, topic) if topic in _COMMANDS else overview(_COMMANDS))
    sys.exit(0)
  if first not in _COMMANDS:
    close = closest(first, _COMMANDS)
    _fail(f"unknown command {first!r}; fix: "
          + (f"did you mean `taipan {close}`? " if close else "")
          + f"(commands: {', '.join(_COMMANDS)}; `taipan --help`)")
  rest = argv[2:]
  if rest[:1] == ["help"] or any(a in ("-h", "--help", "-help", "--helpfull") for a in rest):
    print(command_help(_COMMANDS, first))
    sys.exit(0)
  try:
    _parse(first, f"{argv[0]} {first}", rest)
  except UsageError as e:
    _fail(str(e))
  _set_verbosity()
  errors = _errors()
  try:
    _enable_compilation_cache()
    _COMMANDS[first].run([first] + list(_COMMANDS[first].positional))
  except errors as e:
    _fail(str(e))
  except KeyboardInterrupt:
    # Training saves on the first Ctrl-C by itself; this is a second one, or one outside
    # the training loop (loading, compiling): stop without a traceback.
    print(f"\ntaipan {first}: interrupted", file=sys.stderr, flush=True)
    sys.exit(130)


if __name__ == "__main__":
  main()
