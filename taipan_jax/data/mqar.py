"""Multi-query associative recall (MQAR, Zoology), generated on the device, no download.

A row shows n key-value pairs, then queries: a key seen before, followed by its value. The
model is scored on predicting each queried value from its key, which needs recall across the
sequence: the task that separates attention from pure state-space models.

Layout (V = vocab_size): keys from [1, V/2), values from [V/2, V), 0 pads.
    k1 v1 k2 v2 ... kn vn | q1 v(q1) q2 v(q2) ... [0]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mqar_batch(key, *, batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int):
  """Returns a dict of [batch, seq_len] arrays: tokens (int32), targets (int32, the next
  token) and loss_mask (bool, True where the target is a queried value)."""
  n = num_kv_pairs
  half = vocab_size // 2
  num_queries = (seq_len - 2 * n) // 2
  k_keys, k_vals, k_query = jax.random.split(key, 3)
  # n distinct keys per row: the first n of a random ordering of the key vocabulary.
  noise = jax.random.uniform(k_keys, (batch_size, half - 1))
  keys = jnp.argsort(noise, axis=-1)[:, :n] + 1
  values = jax.random.randint(k_vals, (batch_size, n), half, vocab_size)
  which = jax.random.randint(k_query, (batch_size, num_queries), 0, n)
  q_keys = jnp.take_along_axis(keys, which, axis=-1)
  q_vals = jnp.take_along_axis(values, which, axis=-1)
  context = jnp.stack([keys, values], axis=-1).reshape(batch_size, 2 * n)
  queries = jnp.stack([q_keys, q_vals], axis=-1).reshape(batch_size, 2 * num_queries)
  tokens = jnp.concatenate([context, queries], axis=-1)
  tokens = jnp.pad(tokens, ((0, 0), (0, seq_len - tokens.shape[1]))).astype(jnp.int32)
  targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
  pos = jnp.arange(seq_len)
  is_query_key = (pos >= 2 * n) & ((pos - 2 * n) % 2 == 0) & (pos < 2 * n + 2 * num_queries)
  loss_mask = jnp.broadcast_to(is_query_key, (batch_size, seq_len))
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask}
