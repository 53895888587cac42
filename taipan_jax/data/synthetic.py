"""Embedded synthetic tasks, one example per index: no download, any length, reproducible.

Example i of a task is a pure function of (seed, i), so a grain pipeline over these indices
shuffles, shards and resumes like one over a file.

MQAR (multi-query associative recall, Zoology): n key-value pairs, then queries, each a key
seen before followed by its value; scored on predicting each queried value. Keys come from
[1, V/2), values from [V/2, V), 0 pads.
    k1 v1 k2 v2 ... kn vn | q1 v(q1) q2 v(q2) ... [0]
With `num_queries` > 0, exactly that many queries (each key at most once while keys last)
sit at random 2-token slots after the pairs, and 0 fills the gaps: few tokens need recall,
and a query can be far from its key (Zoology's layout, which spaces queries out).
    k1 v1 ... kn vn | 0 0 q1 v(q1) 0 0 0 0 q2 v(q2) 0 0 ...

Copy (induction heads): a random string, a separator, the string again; scored on the second
copy, which can only be predicted by looking back to the first.
    x1 ... xn SEP x1 ... xn [0]      (SEP = V - 1, x from [1, V - 1))
"""
from __future__ import annotations

import numpy as np


def _rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, index])


def mqar_example(seed: int, index: int, *, seq_len: int, num_kv_pairs: int,
                 vocab_size: int, num_queries: int = 0) -> dict:
  """Returns [seq_len] arrays: tokens, targets (the next token), loss_mask (queried values).

  num_queries: 0 fills every slot after the pairs with a query (keys drawn with
  replacement); k > 0 places k queries at random slots, 0 in between."""
  rng = _rng(seed, index)
  n, half = num_kv_pairs, vocab_size // 2
  slots = (seq_len - 2 * n) // 2              # 2-token slots after the pairs
  keys = rng.permutation(half - 1)[:n] + 1
  values = rng.integers(half, vocab_size, n)
  if num_queries:
    which = np.concatenate([rng.permutation(n) for _ in range(-(-num_queries // n))])
    which = which[:num_queries]
    starts = 2 * n + 2 * np.sort(rng.choice(slots, num_queries, replace=False))
  else:
    which = rng.integers(0, n, slots)
    starts = 2 * n + 2 * np.arange(slots)
  tokens = np.zeros(seq_len + 1, np.int32)
  tokens[:2 * n] = np.stack([keys, values], -1).reshape(-1)
  tokens[starts], tokens[starts + 1] = keys[which], values[which]
  loss_mask = np.zeros(seq_len, bool)
  loss_mask[starts] = True
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
