"""One language model class for Taipan and every baseline, built from a layer pattern."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from taipan_jax import ops
from taipan_jax.config import layer_kinds, padded_vocab_size, residual_branches
from taipan_jax.models.attention import AttentionBlock
from taipan_jax.models.mamba2 import Mamba2Block
from taipan_jax.models.norms import RMSNorm
from taipan_jax.models.sal import SelectiveAttentionLayer
from taipan_jax.sharding import constrain, with_axes

_LAYERS = {"m": Mamba2Block, "s": SelectiveAttentionLayer, "a": AttentionBlock}


class LanguageModel(nnx.Module):
  """Embedding -> layers from `model.pattern` x `model.num_units` -> RMSNorm -> LM head.

  Taipan ('mmmmmms'), Mamba-2 ('m'), Transformer++ ('a'), Jamba-style ('mmmmmmma') and the
  SWA-only hybrid (Taipan with `sal.selection='all'`) are configurations of this class.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    m = cfg.model
    self.config = ml_collections.FrozenConfigDict(cfg)
    self.kinds = layer_kinds(cfg)
    self.vocab_size = m.vocab_size
    self.capacity = cfg.sal.capacity
    self.dtype = jnp.dtype(m.dtype)
    pdt = jnp.dtype(m.param_dtype)
    residual_scale = 1.0 / math.sqrt(residual_branches(cfg))
    self.embed = nnx.Embed(padded_vocab_size(cfg), m.d_model,
                           embedding_init=nnx.initializers.normal(0.02), dtype=self.dtype,
                           param_dtype=pdt, rngs=rngs,
                           embedding_metadata=with_axes("vocab", "embed"))
    self.layers = nnx.List([_LAYERS[kind](cfg, residual_scale=residual_scale, rngs=rngs)
                            for kind in self.kinds])
    for ordinal, layer in enumerate(l for l in self.layers if l.selects):
      layer.select_seed = ordinal
    self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, dtype=self.dtype, param_dtype=pdt)
    self.lm_head = None if m.tie_embeddings else nnx.Linear(
        m.d_model, padded_vocab_size(cfg), use_bias=False,
        kernel_init=nnx.initializers.normal(0.02), dtype=self.dtype, param_dtype=pdt,
        rngs=rngs, kernel_metadata=with_axes("embed", "vocab"))

  @property
  def num_sal(self) -> int:
    return self.kinds.count("s")

  def logits(self, h):
    """The residual stream after the last layer -> logits.  h: [..., d_model] -> [..., vocab]
    fp32."""
    h = self.final_norm(h)
    logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
    return constrain(logits[..., :self.vocab_size].astype(jnp.float32),
                     ("batch", "length", "vocab"))

  def cross_entropy_sums(self, h, targets, weights, *, chunk: int):
    """The LM head's loss without its [batch, seq, vocab] logits (ops.linear_cross_entropy).

    h: [batch, seq, d_model] the last layer's residual stream (`return_hidden=True`);
    targets: [batch, seq] int; weights: [batch, seq] float. chunk: sequence positions per
    step. -> (sum of weighted cross-entropy, sum of weighted argmax hits), fp32 scalars.
    """
    w = self.embed.embedding[...] if self.lm_head is None else self.lm_head.kernel[...].T
    return ops.linear_cross_entropy(self.final_norm(h), w[:self.vocab_size], targets, weights,
                                    chunk=chunk, dtype=self.dtype)

  def __call__(self, tokens, *, token_mask=None, segment_ids=None, gumbel_key=None, tau=None,
               forced_rate=None, return_masks: bool = False, cache: tuple | None = None,
               return_cache: bool = False, return_hidden: bool = False):
    """tokens: [batch, seq] int32 -> logits [batch, seq, vocab_size] fp32, aux.

    token_mask: [batch, seq] bool, real tokens (padding does not count in the selected
      fraction). segment_ids: [batch, seq] int, packed documents as contiguous runs of one
      id: no layer mixes tokens of different segments. It does not imply token_mask (pass
      that separately, e.g. segment_ids > 0 where 0 marks padding). Not with return_cache.
      gumbel_key: PRNG key for the SALs' Gumbel noise in training mode (default: the model's
      own 'gumbel' stream). tau: Gumbel temperature override (annealing). forced_rate: in
      training, also select each token with this probability (the dense-to-sparse warm-up,
      sal.dense_warmup_steps; the selected fraction and the budget loss count the gates'
      own draws).
    aux: selected_fraction [num_sal, batch], budget_loss scalar, and with return_masks
      select_masks [num_sal, batch, seq] and mix_weights [num_sal, batch, seq] (eq. 5's
      weight of each SAL's attention output, select * alpha). With return_cache, also the
      decode cache after the prompt: (logits, aux, cache).
    cache: continue a sequence (evaluation mode, no segment_ids): the tokens come after what
      the cache holds (init_cache(), a prefill's or an earlier call's). Streaming a document
      through in segments this way gives the logits of one call over all of it.
    return_hidden: the first output is the last layer's residual stream [batch, seq,
      d_model] instead of the logits; `model.logits(h)` maps any part of it to logits, so a
      long prefill or evaluation never holds a [seq, vocab] array.
    """
    # The residual stream: rows over the batch axes, the length over the sequence axis.
    stream = lambda h: constrain(h, ("batch", "length", None))
    h = stream(self.embed(tokens).astype(jnp.float32))
    keys = (jax.random.split(gumbel_key, max(self.num_sal, 1)) if gumbel_key is not None
            else [None] * self.num_sal)
    fractions, masks, mixes, caches = [], [], [], []
    if cache is not None and len(cache) != len(self.layers):
      raise ValueError(f"cache has {len(cache)} entries but the model has {len(self.layers)} "
                       "layers; fix: build it with this model's init_cache()")
    keys = iter(keys)
    for index, layer in enumerate(self.layers):
      out = layer(h, token_mask=token_mask, segment_ids=segment_ids,
                  gumbel_key=next(keys) if layer.selects else None, tau=tau,
                  forced_rate=forced_rate,
                  return_cache=return_cache, cache=None if cache is None else cache[index],
                  token_ids=tokens)
      h = stream(out.h)
      if layer.selects:
        fractions.append(out.aux["fraction"])
        masks.append(out.aux["mask"])
        mixes.append(out.aux["mix"])
      caches.append(out.cache)
    logits = h if return_hidden else self.logits(h)
    b = tokens.shape[0]
    fractions = jnp.stack(fractions) if fractions else jnp.zeros((0, b), jnp.float32)
    aux = {"selected_fraction": fractions,
           "budget_loss": ops.budget_loss(fractions, self.capacity)}
    if return_masks:
      none = jnp.zeros((0,) + tokens.shape, jnp.float32)
      aux["select_masks"] = jnp.stack(masks) if masks else none
      aux["mix_weights"] = jnp.stack(mixes) if mixes else none
    if return_cache:
      return logits, aux, tuple(caches)
    return logits, aux

  def init_cache(self, batch_size: int) -> tuple:
    """An empty decode cache: one entry per layer, sizes independent of sequence length
    (except 'a' layers, which preallocate attention.max_cache_len)."""
    return tuple(layer.init_cache(batch_size) for layer in self.layers)

  def step(self, tokens, cache: tuple):
    """Decode one token per row with deterministic selection.

    tokens: [batch] int32 -> (logits [batch, vocab_size] fp32, new cache).
    """
    h = self.embed(tokens).astype(jnp.float32)
    new_cache = []
    for layer, c in zip(self.layers, cache):
      h, _, c = layer.step(h, c, token_ids=tokens)
      new_cache.append(c)
    return self.logits(h), tuple(new_cache)
