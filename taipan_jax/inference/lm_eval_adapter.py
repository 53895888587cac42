r"""An lm-evaluation-harness model over a trained workdir, registered as `taipan_jax`.

    python -m taipan_jax.inference.lm_eval_adapter --model taipan_jax \
        --model_args workdir=/path/to/run --tasks lambada_openai,hellaswag,piqa,arc_easy

runs lm-eval's own command line with this model registered (lm-eval finds models only in
modules it has imported; this entry point imports this one first). From Python:
`lm_eval.simple_evaluate(model=TaipanLM(workdir=...), tasks=[...])`.

The three request types lm-eval sends:
  loglikelihood(context, continuation) -> (sum of log p(continuation tokens), greedy?)
  loglikelihood_rolling(text) -> sum of log p over the whole text (BOS-prefixed)
  generate_until(context, {until, max_gen_toks, temperature, ...}) -> text
Scored sequences are padded on the right to a power of two (at least 64) so a few shapes
compile: every layer is causal, so the padding never reaches a scored position. Texts longer
than `max_length` are scored by streaming segments through the cache
(long_context.stream_nll).
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from taipan_jax.inference.generate import Generator
from taipan_jax.inference.long_context import stream_nll
from taipan_jax.inference.sampling import Sampling

try:
  from lm_eval.api.model import LM as _Base
  from lm_eval.api.registry import register_model as _register
except ImportError:           # the adapter's logic is usable (and tested) without lm-eval
  _Base = object
  _register = None


def _padded_length(n: int) -> int:
  return max(64, 1 << (n - 1).bit_length())


class TaipanLM(_Base):
  """workdir: a `taipan train` directory of a text model (its tokenizer is used).
  loaded: an already loaded `inference.load.Loaded` instead. max_length: the longest
  sequence scored in one forward; longer ones stream in segments of that length."""

  def __init__(self, workdir: str | None = None, *, loaded=None, max_length: int = 4096,
               batch_size: int = 1, **unused):
    if _Base is not object:
      super().__init__()
    if loaded is None:
      if not workdir:
        raise ValueError("taipan_jax needs model_args workdir=<a `taipan train` directory>")
      from taipan_jax.inference.load import load_workdir
      loaded = load_workdir(workdir)
    if loaded.tokenizer is None:
      raise ValueError(f"the model in {workdir!r} was trained on {loaded.cfg.data.task!r}, "
                       "not text: lm-eval needs a text model with a tokenizer")
    self.model, self.tokenizer = loaded.model, loaded.tokenizer
    self.max_length = int(max_length)
    self.generator = Generator(self.model)
    graphdef, self._state = self.generator.graphdef, self.generator.state

    def log_probs(state, ids):
      logits, _ = nnx.merge(graphdef, state)(ids)
      return jax.nn.log_softmax(logits, -1)
    self._log_probs = jax.jit(log_probs)

  # -- lm-eval's three request types -------------------------------------------------------

  def _score(self, ids: list[int], n_scored: int) -> tuple[float, bool]:
    """Log-probability of the last n_scored tokens of ids given the rest; greedy: each was
    the argmax."""
    if len(ids) <= self.max_length:
      padded = np.zeros((1, _padded_length(len(ids))), np.int32)
      padded[0, :len(ids)] = ids
      lp = np.asarray(self._log_probs(self._state, jnp.asarray(padded))[0])
      positions = np.arange(len(ids) - n_scored - 1, len(ids) - 1)
      targets = np.asarray(ids[len(ids) - n_scored:])
      ll = float(lp[positions, targets].sum())
      return ll, bool((lp[positions].argmax(-1) == targets).all())
    nll = stream_nll(self.model, np.asarray(ids), segment_len=self.max_length, log=None)
    return -float(nll[-n_scored:].sum()), False

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    out = []
    for request in requests:
      context, continuation = request.args
      # A context's trailing spaces belong to the continuation's first piece.
      stripped = context.rstrip(" ")
      continuation = context[len(stripped):] + continuation
      ctx = self.tokenizer.EncodeAsIds(stripped) if stripped else []
      cont = self.tokenizer.EncodeAsIds(continuation)
      out.append(self._score([self.tokenizer.bos_id()] + ctx + cont, len(cont)))
    return out

  def loglikelihood_rolling(self, requests) -> list[float]:
    out = []
    for request in requests:
      ids = self.tokenizer.EncodeAsIds(request.args[0])
      out.append(self._score([self.tokenizer.bos_id()] + ids, len(ids))[0])
    return out

  def generate_until(self, requests) -> list[str]:
    out = []
    for request in requests:
      context, kwargs = request.args
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", True) \
          else 0.0
      prompt = [self.tokenizer.bos_id()] + self.tokenizer.EncodeAsIds(context)
      new = self.generator.generate(
          [prompt[-self.max_length:]], max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
          sampling=Sampling(temperature=temperature), stop_tokens=[self.tokenizer.eos_id()],
          seed=int(kwargs.get("seed", 0)))[0]
      text = self.tokenizer.DecodeIds([t for t in new if t != self.tokenizer.eos_id()])
      cuts = [text.index(u) for u in until if u and u in text]
      out.append(text[:min(cuts)] if cuts else text)
    return out

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
    if "max_length" in args:
      args["max_length"] = int(args["max_length"])
    return cls(**args)


if _register is not None:
  _register("taipan_jax")(TaipanLM)


def main(argv=None):
  """lm-eval's command line with `taipan_jax` registered."""
  try:
    from lm_eval.__main__ import cli_evaluate
  except ImportError:
    raise SystemExit("taipan_jax lm-eval adapter: lm-eval is not installed; fix: pip install "
                     "lm-eval") from None
  sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
  cli_evaluate()


if __name__ == "__main__":
  main()
