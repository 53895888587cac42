r"""The `taipan` command: thin subcommands that parse, validate once, and call the library.

    taipan train --config=configs/tiny.py --workdir=/tmp/tiny [--config.train.steps=300]
    taipan eval --workdir=/tmp/tiny [--data=path/or/glob]
    taipan eval --workdir=/tmp/run --long_context --data=book.txt --max_tokens=1048576
    taipan generate --workdir=/tmp/run --prompt="def main(" [--temperature=0.8 --top_p=0.95]
    taipan tokenizer train --input='corpus/**/*.txt' --vocab_size=8192 --output=/tmp/spm
    taipan convert --hf_dir=path/to/mamba2 --workdir=/tmp/m2 [--upcycle_sal_every=6]

A bad input stops with one line `taipan: error: ...` naming the value and the fix, and a
non-zero exit, before any file is written.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

_USAGE = ("usage: taipan {train,eval,generate,convert,tokenizer train} [--flags]; "
          "see `taipan train --helpfull`")

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
                                "forward call.")
_FIRST_BUCKET = flags.DEFINE_integer("first_bucket", 1024, "eval --long_context: the first "
                                     "position bucket's size; each next one doubles.")
_FRESH = flags.DEFINE_list("fresh_starts", [], "eval --long_context: positions from which the "
                          "document is streamed again from an empty cache, to tell a bucket's "
                          "position from its text (long_context.fresh_start_control).")
_OUT = flags.DEFINE_string("out", None, "eval --long_context: output stem for .json/.png "
                           "(default <workdir>/long_context/<data name>).")
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
_VOCAB = flags.DEFINE_integer("vocab_size", 8192, "tokenizer: pieces in the vocabulary.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "tokenizer: algorithm.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "tokenizer: text field of .jsonl records.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "convert: a Hugging Face / state-spaces Mamba-2 "
                              "checkpoint directory (config.json + safetensors).")
_UPCYCLE = flags.DEFINE_integer("upcycle_sal_every", 0, "convert: 0 keeps the Mamba-2; K > 0 "
                                "grows a Taipan with a fresh SAL after every K blocks.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): 'auto' when the environment names a multi-process "
    "job (JAX_COORDINATOR_ADDRESS, SLURM, multi-host TPU).")


class UsageError(ValueError):
  pass


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


def _train(argv):
  from taipan_jax.config import load_config, parse_overrides
  from taipan_jax.training.loop import train
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; {_USAGE}")
  cfg = load_config(_CONFIG.value, parse_overrides(_overrides))
  _maybe_initialize_distributed()
  train(cfg, _WORKDIR.value)


def _eval(argv):
  from taipan_jax.training.loop import evaluate_workdir
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; {_USAGE}")
  if not _WORKDIR.value:
    raise UsageError("eval needs --workdir (the directory `taipan train` wrote)")
  if _LONG.value:
    _eval_long_context()
    return
  _maybe_initialize_distributed()
  evaluate_workdir(_WORKDIR.value, data_path=_DATA.value, batches=_EVAL_BATCHES.value)


def _eval_long_context():
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
  loaded = load_workdir(_WORKDIR.value)
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
  from taipan_jax.data.tokenizer import EOS_ID
  from taipan_jax.inference import Generator, Sampling
  from taipan_jax.inference.load import load_workdir
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; {_USAGE}")
  if not _WORKDIR.value:
    raise UsageError("generate needs --workdir (the directory `taipan train` wrote)")
  if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
    raise UsageError("generate needs exactly one of --prompt=<text> or --prompt_ids=1,2,3")
  sampling = Sampling(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value)
  loaded = load_workdir(_WORKDIR.value)
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
  stop = [EOS_ID] if loaded.tokenizer is not None else []
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
  if argv[1:] != ["train"]:
    raise UsageError(f"unknown tokenizer command {argv[1:]}; use `taipan tokenizer train`")
  if not _INPUT.value or not _OUTPUT.value:
    raise UsageError("tokenizer train needs --input=<file, dir or glob> and --output=<prefix>")
  docs = TextDocuments(_INPUT.value, _TEXT_FIELD.value)
  path = train_tokenizer((docs[i] for i in range(len(docs))), _OUTPUT.value,
                         vocab_size=_VOCAB.value, model_type=_MODEL_TYPE.value)
  print(f"wrote {path} ({_VOCAB.value} pieces, {_MODEL_TYPE.value}, byte fallback) from "
        f"{len(docs)} documents; train with --config.data.tokenizer={path} "
        f"--config.model.vocab_size={_VOCAB.value}")


def _convert(argv):
  from taipan_jax.interop import load_hf_mamba2, upcycle_to_taipan
  from taipan_jax.interop.convert import save_workdir
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; {_USAGE}")
  if not _HF_DIR.value or not _WORKDIR.value:
    raise UsageError("convert needs --hf_dir=<checkpoint directory> and --workdir=<output>")
  model, cfg = load_hf_mamba2(_HF_DIR.value)
  if _UPCYCLE.value:
    model, cfg = upcycle_to_taipan(model, cfg, sal_every=_UPCYCLE.value)
  path = save_workdir(model, cfg, _WORKDIR.value)
  print(f"wrote {_WORKDIR.value} ({cfg.model.pattern} x {cfg.model.num_units}); fine-tune with "
        f"`taipan train --config={path} --workdir={_WORKDIR.value} --config.data...`")


_COMMANDS = {"train": _train, "eval": _eval, "generate": _generate, "convert": _convert,
             "tokenizer": _tokenizer}


def _run(command):
  def main(argv):
    # orbax and grain log every save and read at INFO; progress lines are ours.
    logging.set_verbosity(logging.WARNING)
    from taipan_jax.config import ConfigError
    from taipan_jax.data.errors import DataError
    from taipan_jax.training.checkpoint import CheckpointError
    from taipan_jax.interop import InteropError
    from taipan_jax.training.loop import TrainingError
    from taipan_jax.inference import GenerationError
    try:
      command(argv)
    except (ConfigError, DataError, TrainingError, CheckpointError, UsageError, InteropError,
            FileExistsError, GenerationError) as e:
      _fail(str(e))
  return main


def main(argv=None):
  """`taipan <command> [flags]`; argv defaults to sys.argv (callable again in-process)."""
  argv = list(sys.argv if argv is None else argv)
  flags.FLAGS.unparse_flags()
  if len(argv) < 2 or argv[1] not in _COMMANDS:
    given = argv[1] if len(argv) > 1 else "nothing"
    _fail(f"unknown command {given!r}; {_USAGE}")
  rest = argv[2:]
  _overrides[:] = [a for a in rest if a.startswith("--config.")]
  rest = [a for a in rest if not a.startswith("--config.")]
  app.run(_run(_COMMANDS[argv[1]]), argv=[f"{argv[0]} {argv[1]}"] + rest)


if __name__ == "__main__":
  main()
