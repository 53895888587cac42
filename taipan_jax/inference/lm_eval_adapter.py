r"""lm-evaluation-harness over a trained workdir: the model `taipan_jax`.

    pip install 'taipan-jax[eval]'
    python -m taipan_jax.inference.lm_eval_adapter --model taipan_jax \
        --model_args workdir=/path/to/run --tasks lambada_openai,hellaswag,piqa,arc_easy \
        --batch_size 16

runs lm-eval's own command line with this model registered (lm-eval finds models only in
modules it has imported; this entry point imports this one first). From Python:
`lm_eval.simple_evaluate(model=TaipanLM(workdir=...), tasks=[...])`.

`TaipanLM` is lm-eval's `TemplateLM`: lm-eval splits context and continuation and tokenizes
them (through `tok_encode`); this module scores token ids. `Scorer` does the scoring and needs
no lm-eval: requests are sorted by length and scored `batch_size` rows at a time, padded on
the right to a power of two (at least 64) and to a full batch, so that few shapes compile:
every layer is causal, so padding never reaches a scored position. Every scored sequence
starts with the tokenizer's begin-of-text id, as the training documents did. A sequence
longer than `max_length` streams through the cache in segments (long_context.stream_nll).
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


def _padded_length(n: int) -> int:
  return max(64, 1 << (n - 1).bit_length())


class Scorer:
  """Log-likelihoods of token ids under a loaded model, in batches.

  loaded: `inference.load.Loaded` of a text run. max_length: the longest sequence scored in
  one forward; longer ones stream in segments of that length. batch_size: rows a forward.
  """

  def __init__(self, loaded, *, max_length: int = 4096, batch_size: int = 1):
    if loaded.tokenizer is None:
      raise ValueError(f"the model was trained on {loaded.cfg.data.task!r}, not text: "
                       "lm-eval needs a text model with a tokenizer")
    self.model, self.tokenizer = loaded.model, loaded.tokenizer
    self.bos, self.eos = self.tokenizer.bos_id(), self.tokenizer.eos_id()
    self.max_length, self.batch_size = int(max_length), max(int(batch_size), 1)
    self.generator = Generator(self.model)
    graphdef = self.generator.graphdef
    self._state = self.generator.state

    def log_probs(state, ids):
      logits, _ = nnx.merge(graphdef, state)(ids)
      return jax.nn.log_softmax(logits, -1)
    self._log_probs = jax.jit(log_probs)

  def score(self, sequences: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    """(ids, n): log p of the last n ids given the ones before, and whether each of them
    was the argmax (greedy); ids start with the begin-of-text id."""
    out: list[tuple[float, bool] | None] = [None] * len(sequences)
    short = []
    for i, (ids, n) in enumerate(sequences):
      if len(ids) <= self.max_length:
        short.append(i)
      else:
        nll = stream_nll(self.model, np.asarray(ids), segment_len=self.max_length, log=None)
        out[i] = (-float(nll[-n:].sum()), False)
    short.sort(key=lambda i: len(sequences[i][0]))    # one padded length per batch, mostly
    for start in range(0, len(short), self.batch_size):
      chunk = short[start:start + self.batch_size]
      length = _padded_length(max(len(sequences[i][0]) for i in chunk))
      padded = np.zeros((self.batch_size, length), np.int32)
      for row, i in enumerate(chunk):
        ids = sequences[i][0]
        padded[row, :len(ids)] = ids
      lp = np.asarray(self._log_probs(self._state, jnp.asarray(padded)))
      for row, i in enumerate(chunk):
        ids, n = sequences[i]
        positions = np.arange(len(ids) - n - 1, len(ids) - 1)
        targets = np.asarray(ids[len(ids) - n:])
        out[i] = (float(lp[row, positions, targets].sum()),
                  bool((lp[row, positions].argmax(-1) == targets).all()))
    return out

  def generate(self, context: str, *, until: list[str], max_new_tokens: int,
               temperature: float = 0.0, seed: int = 0) -> str:
    prompt = [self.bos] + self.tokenizer.EncodeAsIds(context)
    new = self.generator.generate(
        [prompt[-self.max_length:]], max_new_tokens=max_new_tokens,
        sampling=Sampling(temperature=temperature), stop_tokens=[self.eos], seed=seed)[0]
    text = self.tokenizer.DecodeIds([t for t in new if t != self.eos])
    cuts = [text.index(u) for u in until if u and u in text]
    return text[:min(cuts)] if cuts else text


try:
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
except ImportError:           # the Scorer works (and is tested) without lm-eval
  TemplateLM = None


if TemplateLM is not None:

  @register_model("taipan_jax")
  class TaipanLM(TemplateLM):
    """workdir: a `taipan train` directory of a text model (its tokenizer is used);
    loaded: an already loaded `inference.load.Loaded` instead. max_length: the longest
    sequence scored in one forward. batch_size: sequences scored a forward ("auto": 16)."""

    def __init__(self, workdir: str | None = None, *, loaded=None, max_length: int = 4096,
                 batch_size: int | str = 1, **unused):   # lm-eval also passes device etc.
      super().__init__()
      if loaded is None:
        if not workdir:
          raise ValueError("taipan_jax needs model_args workdir=<a `taipan train` directory>")
        from taipan_jax.inference.load import load_workdir
        loaded = load_workdir(workdir, log=lambda _: None)
      batch = 16 if str(batch_size).startswith("auto") else int(batch_size)
      self.scorer = Scorer(loaded, max_length=int(max_length), batch_size=batch)

    @property
    def eot_token_id(self) -> int:
      return self.scorer.eos

    @property
    def prefix_token_id(self) -> int:     # an empty context is the begin-of-text token
      return self.scorer.bos

    @property
    def max_length(self) -> int:
      return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
      return self.scorer.tokenizer.EncodeAsIds(string)

    def tok_decode(self, tokens, **kwargs) -> str:
      return self.scorer.tokenizer.DecodeIds(list(tokens))

    def _with_bos(self, ids: list[int]) -> list[int]:
      # Text never encodes to the begin-of-text id, so a leading one is lm-eval's prefix.
      return ids if ids[:1] == [self.scorer.bos] else [self.scorer.bos] + ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
      return self.scorer.score([(self._with_bos(list(ctx) + list(cont)), len(cont))
                                for _, ctx, cont in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
      sequences = []
      for request in requests:
        ids = self.tok_encode(request.args[0])
        sequences.append(([self.scorer.bos] + ids, len(ids)))
      return [ll for ll, _ in self.scorer.score(sequences)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
      out = []
      for request in requests:
        context, kwargs = request.args
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = kwargs.get("do_sample", False)
        out.append(self.scorer.generate(
            context, until=until, max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
            temperature=float(kwargs.get("temperature", 0.0)) if sample else 0.0,
            seed=int(kwargs.get("seed", 0))))
      return out


def main(argv=None):
  """lm-eval's command line with `taipan_jax` registered."""
  try:
    from lm_eval.__main__ import cli_evaluate
  except ImportError:
    raise SystemExit("taipan_jax lm-eval adapter: lm-eval is not installed; fix: pip install "
                     "'taipan-jax[eval]'") from None
  sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
  cli_evaluate()


if __name__ == "__main__":
  main()
