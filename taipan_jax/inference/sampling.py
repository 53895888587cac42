"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class GenerationError(ValueError):
  """A request generation cannot serve (the message names the value and the fix)."""


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy (argmax). top_k 0 and top_p 1.0 switch those filters off; with
  both set, top-k is applied first, then top-p over what is left."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise GenerationError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise GenerationError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
    if not 0 < self.top_p <= 1:
      raise GenerationError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")


def sample_logits(logits, key, sampling: Sampling):
  """logits: [batch, vocab] fp32 -> [batch] int32 token ids."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1:
    # Keep the smallest set of most likely tokens whose probability reaches top_p: a token
    # stays if the mass strictly before it (in descending order) is below top_p.
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = before < sampling.top_p
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
