"""Embedded synthetic tasks, one example per index: no download, any length, reproducible.

Example i of a task is a pure function of (seed, i), so a grain pipeline over these indices
shuffles, shards and resumes like one over a file.

MQAR (multi-query associative recall, Zoology): n key-value pairs, then queries, each a key
seen before followed by its value; scored on predicting each queried value. Keys come from
[1, V/2), values from [V/2, V), 0 pads.
    k1 v1 k2 v2 ... kn vn | q1 v(q1) q2 v(q2) ... [0]

Copy (induction heads): a random string, a separator, the string again; scored on the second
copy, which can only be predicted by looking back to the first.
    x1 ... xn SEP x1 ... xn [0]      (SEP = V - 1, x from [1, V - 1))
"""
from __future__ import annotations

import numpy as np


def _rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, index])


def mqar_example(seed: int, index: int, *, seq_len: int, num_kv_pairs: int,
                 vocab_size: int) -> dict:
  """Returns [seq_len] arrays: tokens, targets (the next token), loss_mask (queried values)."""
  rng = _rng(seed, index)
  n, half = num_kv_pairs, vocab_size // 2
  num_queries = (seq_len - 2 * n) // 2
  keys = rng.permutation(half - 1)[:n] + 1
  values = rng.integers(half, vocab_size, n)
  which = rng.integers(0, n, num_queries)
  body = np.concatenate([np.stack([keys, values], -1).reshape(-1),
                         np.stack([keys[which], values[which]], -1).reshape(-1)])
  tokens = np.zeros(seq_len + 1, np.int32)
  tokens[:body.size] = body
  pos = np.arange(seq_len)
  loss_mask = (pos >= 2 * n) & ((pos - 2 * n) % 2 == 0) & (pos < 2 * n + 2 * num_queries)
  return _lm_example(tokens, loss_mask)


def copy_example(seed: int, index: int, *, seq_len: int, vocab_size: int) -> dict:
  """Returns [seq_len] arrays: tokens, targets, loss_mask (the second copy's tokens)."""
  rng = _rng(seed, index)
  n = (seq_len - 1) // 2
  x = rng.integers(1, vocab_size - 1, n)
  tokens = np.zeros(seq_len + 1, np.int32)
  tokens[:2 * n + 1] = np.concatenate([x, [vocab_size - 1], x])
  pos = np.arange(seq_len)
  loss_mask = (pos >= n) & (pos < 2 * n)     # predicts tokens n+1 .. 2n: the copy
  return _lm_example(tokens, loss_mask)


def _lm_example(tokens, loss_mask) -> dict:
  """tokens: [seq_len + 1] -> inputs/targets shifted by one, loss weights as float32."""
  return {"tokens": tokens[:-1], "targets": tokens[1:],
          "loss_mask": loss_mask.astype(np.float32),
          "segment_ids": np.ones(tokens.size - 1, np.int32)}
