"""grain pipelines from a validated config to batches of numpy arrays.

Every batch is a dict of [batch_per_process, seq_len] arrays:
  tokens, targets (int32), loss_mask (float32 weights), segment_ids (int32, 0 = padding),
  example_ids (int32: the index of the example or document each token came from).

Training data is an infinite, seeded, deterministic stream: synthetic example i (each
process reading its contiguous block of every global batch, so batches do not depend on the
process count) or a shuffled epoch-by-epoch order of the training documents (each process
reading every `process_count`-th document from `process_index` on). The iterator's state
(a few integers) is saved with every checkpoint, so a resumed run continues exactly where it
stopped.

Text documents are tokenized in grain workers (`data.num_workers` processes; 0 tokenizes in
the main process), wrapped as <s> doc </s>, and packed by concatenate-then-split into rows of
seq_len + 1 tokens, so no token is dropped; segment ids keep documents apart.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import grain
from absl import flags
import numpy as np
from grain import experimental as grain_exp

from taipan_jax.data import synthetic
from taipan_jax.data.errors import DataError
from taipan_jax.data.text import TextDocuments, split_indices
from taipan_jax.data.tokenizer import check_vocab, load_tokenizer

# Held-out synthetic examples come from another seed, so they never appear in training.
_EVAL_SEED_OFFSET = 1_000_003
_SYNTHETIC_LENGTH = 2**40      # "infinite": example indices never wrap in a real run


def _synthetic_example(index, *, task: str, seed: int, seq_len: int, num_kv_pairs: int,
                       num_queries: int, vocab_size: int):
  if task == "mqar":
    ex = synthetic.mqar_example(seed, int(index), seq_len=seq_len, num_kv_pairs=num_kv_pairs,
                                vocab_size=vocab_size, num_queries=num_queries)
  else:
    ex = synthetic.copy_example(seed, int(index), seq_len=seq_len, vocab_size=vocab_size)
  ex["example_ids"] = np.full(seq_len, index, np.int32)
  return ex


def _process_block(i: int, *, rows: int, process_index: int, process_count: int) -> int:
  """The global example index of this process's i-th example: each global batch is the
  processes' contiguous blocks of `rows` in process order, so the rows of a batch (and the
  Gumbel noise each row gets) are the same whatever the number of processes."""
  return (i // rows) * rows * process_count + process_index * rows + i % rows


def _synthetic_dataset(cfg, seed: int, *, rows: int = 1, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
  d = cfg.data
  make = functools.partial(_synthetic_example, task=d.task, seed=seed, seq_len=d.seq_len,
                           num_kv_pairs=d.num_kv_pairs, num_queries=d.num_queries,
                           vocab_size=cfg.model.vocab_size)
  ds = grain.MapDataset.range(_SYNTHETIC_LENGTH // process_count)
  if process_count > 1:
    ds = ds.map(functools.partial(_process_block, rows=rows, process_index=process_index,
                                  process_count=process_count))
  return ds.map(make)


class _Tokenize(grain.transforms.Map):
  """document index -> {"tokens": <s> ids </s>, "example_ids": the index, per token}.

  Holds the tokenizer's path and loads it in whichever process runs it (grain workers).
  """

  def __init__(self, documents: TextDocuments, tokenizer_path: str):
    self.documents = documents
    self.tokenizer_path = tokenizer_path
    self._sp = None

  def __getstate__(self):
    return {**self.__dict__, "_sp": None}

  def map(self, index):
    if self._sp is None:
      self._sp = load_tokenizer(self.tokenizer_path)
    ids = self._sp.EncodeAsIds(self.documents[int(index)])
    tokens = np.asarray([self._sp.bos_id(), *ids, self._sp.eos_id()], np.int32)
    return {"tokens": tokens, "example_ids": np.full(tokens.size, index, np.int32)}


def _to_lm_example(row: dict) -> dict:
  """A packed row of seq_len + 1 tokens -> inputs and next-token targets.

  A target counts only when it continues the input's own document: no token is trained to
  predict the first token of the next document, and padding (segment 0) never counts.
  """
  tokens, seg = row["tokens"], row["tokens_segment_ids"]
  same_doc = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
  return {"tokens": tokens[:-1], "targets": tokens[1:],
          "loss_mask": same_doc.astype(np.float32), "segment_ids": seg[:-1].astype(np.int32),
          "example_ids": row["example_ids"][:-1]}


class Corpus(NamedTuple):
  """A text config's documents, indexed once, and their train / held-out split."""
  documents: TextDocuments
  train: np.ndarray
  held_out: np.ndarray


def load_corpus(cfg) -> Corpus | None:
  """Checks the tokenizer against the model and indexes the files (None for synthetic
  tasks). Indexing reads every .jsonl file: build it once and pass it to both makers."""
  d = cfg.data
  if d.task != "text":
    return None
  check_vocab(load_tokenizer(d.tokenizer), cfg.model.vocab_size, d.tokenizer)
  documents = TextDocuments(d.path, d.text_field)
  return Corpus(documents, *split_indices(len(documents), d.eval_fraction))


def _pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  ds = grain_exp.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": seq_len + 1, "example_ids": seq_len + 1})
  return ds.map(_to_lm_example)


def _read_options(cfg) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=cfg.data.read_threads, prefetch_buffer_size=64)


def make_train_iterator(cfg, *, process_index: int = 0, process_count: int = 1,
                        corpus: Corpus | None = None):
  """The training stream of this process: an infinite grain DatasetIterator of batches with
  cfg.train.batch_size // process_count rows each (get_state/set_state for checkpoints).
  corpus: the config's load_corpus(), if already built."""
  d, t = cfg.data, cfg.train
  rows = t.batch_size // process_count
  if d.task == "text":
    corpus = corpus or load_corpus(cfg)
    if corpus.train.size == 0:
      raise DataError(f"data.eval_fraction={d.eval_fraction} leaves none of the "
                      f"{len(corpus.documents)} documents for training; fix: lower it or add "
                      "text")
    ds = (grain.MapDataset.source(corpus.train).seed(t.seed).shuffle().repeat(None)
          [process_index::process_count].map(_Tokenize(corpus.documents, d.tokenizer)))
    it = _pack(ds.to_iter_dataset(_read_options(cfg)), d.seq_len)
  else:
    ds = _synthetic_dataset(cfg, t.seed, rows=rows, process_index=process_index,
                            process_count=process_count)
    it = ds.to_iter_dataset(_read_options(cfg))
  it = it.batch(rows, drop_remainder=True)
  if d.num_workers > 0:
    # grain's worker processes read absl flags; from a library call (no absl app) they are
    # unparsed, and their defaults are what we want.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers))
  return iter(it)


def make_eval_batches(cfg, num_batches: int, *, batch_size: int | None = None,
                      corpus: Corpus | None = None, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """A fixed held-out set: up to num_batches batches of batch_size (default
  train.batch_size) rows over all processes (the held-out documents may run out first); the
  last batch is padded with loss_mask 0 to a full batch. Each process gets its contiguous
  block of every batch's rows; every process reads the same (small) held-out set, so all of
  them see the same number of batches."""
  d = cfg.data
  rows = batch_size or cfg.train.batch_size      # over all processes
  if d.task == "text":
    corpus = corpus or load_corpus(cfg)
    ds = grain.MapDataset.source(corpus.held_out).map(_Tokenize(corpus.documents,
                                                                 d.tokenizer))
    it = _pack(ds.to_iter_dataset(_read_options(cfg)), d.seq_len)
  else:
    it = _synthetic_dataset(cfg, cfg.train.seed + _EVAL_SEED_OFFSET).to_iter_dataset()
  it = iter(it.batch(rows, drop_remainder=False))
  batches = []
  for _ in range(num_batches):
    batch = next(it, None)
    if batch is None:
      break
    short = rows - batch["tokens"].shape[0]
    if short:
      batch = {k: np.pad(v, [(0, short)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
    block = rows // process_count
    batches.append({k: v[process_index * block:(process_index + 1) * block]
                    for k, v in batch.items()})
  return batches
