"""Generation: a parallel prefill that returns the decode cache, then a jitted decode loop.

    gen = Generator(model)
    tokens = gen.generate([[5, 9, 2], [7]], max_new_tokens=64,
                          sampling=Sampling(temperature=0.8, top_p=0.95), stop_tokens=[3])
    for new in gen.stream(prompts, max_new_tokens=256):   # lists of new tokens per row
      print(new)

Prompts may differ in length. The first min(len) tokens of every row go through the chunked
parallel forward at once; each longer row's remaining prompt tokens are fed by the decode
loop itself (forced instead of sampled), so no row is padded and no state sees a pad token.
The decode loop is a `lax.while_loop` over positions: no Python runs per token. `stream`
runs it in chunks of `chunk` tokens and yields after each; the device holds the model's
cache (its size fixed by the config, not by the length) and one chunk of output.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from taipan_jax.inference.sampling import GenerationError, Sampling, sample_logits
from taipan_jax.inference.weights import split_for_decode


@struct.dataclass
class _Loop:
  pos: jax.Array          # [] int32, the position whose token is chosen next
  cache: tuple
  logits: jax.Array       # [b, vocab] fp32, the prediction for position pos
  emitted: jax.Array      # [b] int32, tokens generated so far
  done: jax.Array         # [b] bool
  key: jax.Array


class Generator:
  """Greedy or sampled generation from a LanguageModel (put into evaluation mode here).

  max_prompt_len: prompts longer than this are refused (None: no limit of our own; full
  attention layers still need prompt + new tokens <= attention.max_cache_len).
  """

  def __init__(self, model, *, max_prompt_len: int | None = None):
    model.eval()
    self.vocab_size = model.vocab_size
    self.max_prompt_len = max_prompt_len
    self.cache_limit = (model.config.attention.max_cache_len if "a" in model.kinds else None)
    # Weights in their compute dtype and decode layouts once, not once per call: a copy that
    # both the prefill and the decode loop read (it gives the same results as the model's).
    self.graphdef, self.state = split_for_decode(model)
    self.cache_bytes = 0      # the decode cache's size after the last chunk (it never grows)
    self._prefill = jax.jit(self._prefill_fn)
    self._decode = jax.jit(self._decode_fn, static_argnames=("sampling", "chunk"),
                           donate_argnames=("loop",))

  # -- device functions --------------------------------------------------------------------

  def _prefill_fn(self, state, tokens):
    """tokens: [b, m] -> (logits of position m [b, vocab], cache after m tokens)."""
    model = nnx.merge(self.graphdef, state)
    h, _, cache = model(tokens, return_cache=True, return_hidden=True)
    return model.logits(h[:, -1]), cache

  def _decode_fn(self, state, loop: _Loop, prompts, prompt_len, stop, limit, budget, *, sampling,
                 chunk):
    """Runs until `chunk` tokens are emitted per row, every row is done, or pos == limit.

    prompts: [b, P] int32 (rows padded), prompt_len: [b], stop: [n_stop] int32; budget:
    [] int32, max_new_tokens (a row is done when it has emitted that many).
    Returns (loop, out [b, chunk] int32, n_out [b] int32).
    """
    model = nnx.merge(self.graphdef, state)
    b = prompt_len.shape[0]
    rows = jnp.arange(b)

    def cond(carry):
      loop, _, n_out = carry
      room = jnp.all(n_out < chunk)
      return (loop.pos < limit) & ~jnp.all(loop.done) & room

    def body(carry):
      loop, out, n_out = carry
      forced = loop.pos < prompt_len
      sampled = sample_logits(loop.logits, jax.random.fold_in(loop.key, loop.pos), sampling)
      prompt_token = prompts[rows, jnp.minimum(loop.pos, prompts.shape[1] - 1)]
      token = jnp.where(forced, prompt_token, sampled)
      emit = ~forced & ~loop.done
      out = out.at[rows, jnp.minimum(n_out, chunk - 1)].set(
          jnp.where(emit, token, out[rows, jnp.minimum(n_out, chunk - 1)]))
      n_out = n_out + emit
      emitted = loop.emitted + emit
      done = loop.done | (emit & jnp.isin(token, stop)) | (emitted >= budget)
      logits, cache = model.step(token, loop.cache)
      loop = _Loop(pos=loop.pos + 1, cache=cache, logits=logits, emitted=emitted, done=done,
                   key=loop.key)
      return loop, out, n_out

    out = jnp.zeros((b, chunk), jnp.int32)
    n_out = jnp.zeros((b,), jnp.int32)
    return jax.lax.while_loop(cond, body, (loop, out, n_out))

  # -- host API ----------------------------------------------------------------------------

  def _check(self, prompts, max_new_tokens, stop_tokens):
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not len(prompts):
      raise GenerationError("prompts must be a non-empty list of token-id lists; fix: pass "
                            "[[ids...], ...] (encode text with the model's tokenizer first)")
    lengths = []
    for i, p in enumerate(prompts):
      p = np.asarray(p)
      if p.ndim != 1 or p.size == 0:
        raise GenerationError(f"prompt {i} is empty (shape {p.shape}); fix: give every row "
                              "at least one token, e.g. the BOS id")
      if not np.issubdtype(p.dtype, np.integer):
        raise GenerationError(f"prompt {i} holds {p.dtype} values; fix: pass token ids")
      if p.min() < 0 or p.max() >= self.vocab_size:
        raise GenerationError(f"prompt {i} has token id {int(p.max()) if p.max() >= 0 else int(p.min())} "
                              f"outside [0, {self.vocab_size}); fix: encode with the "
                              "tokenizer the model was trained with")
      if self.max_prompt_len is not None and p.size > self.max_prompt_len:
        raise GenerationError(f"prompt {i} has {p.size} tokens, over max_prompt_len="
                              f"{self.max_prompt_len}; fix: shorten it or raise the limit")
      lengths.append(p.size)
    if max_new_tokens < 1:
      raise GenerationError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if self.cache_limit is not None and max(lengths) + max_new_tokens > self.cache_limit:
      raise GenerationError(
          f"longest prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) exceeds the "
          f"full-attention cache (attention.max_cache_len={self.cache_limit}); fix: lower "
          "max_new_tokens or raise attention.max_cache_len")
    for t in stop_tokens:
      if not 0 <= int(t) < self.vocab_size:
        raise GenerationError(f"stop token {t} is outside [0, {self.vocab_size})")
    return np.asarray(lengths, np.int32)

  def stream(self, prompts, *, max_new_tokens: int, sampling: Sampling = Sampling(),
             stop_tokens: Sequence[int] = (), seed: int = 0,
             chunk: int = 16) -> Iterator[list[list[int]]]:
    """Yields, after each chunk, the new tokens of every row (a list per row, maybe empty).

    A row ends at a stop token (which is included) or after max_new_tokens tokens.
    """
    lengths = self._check(prompts, max_new_tokens, stop_tokens)
    b, m = len(prompts), int(lengths.min())
    padded = np.zeros((b, int(lengths.max())), np.int32)
    for i, p in enumerate(prompts):
      padded[i, :lengths[i]] = p
    logits, cache = self._prefill(self.state, jnp.asarray(padded[:, :m]))
    loop = _Loop(pos=jnp.asarray(m, jnp.int32), cache=cache, logits=logits,
                 emitted=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                 key=jax.random.key(seed))
    # Row i ends by position len_i + max_new_tokens; the loop stops at the last row's end.
    limit = jnp.asarray(int(lengths.max()) + max_new_tokens, jnp.int32)
    args = (jnp.asarray(padded), jnp.asarray(lengths), jnp.asarray(list(stop_tokens) or [-1],
                                                                   jnp.int32))
    budget = jnp.asarray(max_new_tokens, jnp.int32)
    chunk = max(1, min(chunk, max_new_tokens))
    while True:
      loop, out, n_out = self._decode(self.state, loop, *args, limit, budget,
                                      sampling=sampling, chunk=chunk)
      out, n_out = np.asarray(out), np.asarray(n_out)
      self.cache_bytes = sum(x.nbytes for x in jax.tree.leaves(loop.cache))
      yield [out[i, :n_out[i]].tolist() for i in range(b)]
      if bool(np.asarray(loop.done).all()) or int(loop.pos) >= int(limit):
        return

  def generate(self, prompts, *, max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_tokens: Sequence[int] = (), seed: int = 0) -> list[list[int]]:
    """The new tokens of every row (stop token included where one ended the row); the whole
    budget runs as one while_loop."""
    rows = [[] for _ in prompts]
    for new in self.stream(prompts, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_tokens=stop_tokens, seed=seed, chunk=max_new_tokens):
      for row, tokens in zip(rows, new):
        row.extend(tokens)
    return rows
