"""SentencePiece tokenizers: train one on local text, load one, check it against a config.

Ids follow SentencePiece's defaults with padding added: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>.
Padding is id 0 so that packed rows padded with zeros decode as padding.
"""
from __future__ import annotations

import os
from typing import Iterable

import sentencepiece as spm

from taipan_jax.data.errors import DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece skips training sentences longer than this many bytes; documents are fed
# line by line, and longer lines are cut into pieces of this size.
_MAX_SENTENCE_BYTES = 4096


def _sentences(documents: Iterable[str]):
  for doc in documents:
    for line in doc.splitlines():
      line = line.strip()
      while line:
        yield line[:_MAX_SENTENCE_BYTES // 4]      # 4 bytes per char at most in utf-8
        line = line[_MAX_SENTENCE_BYTES // 4:]


def train_tokenizer(documents: Iterable[str], output: str, *, vocab_size: int,
                    model_type: str = "bpe", max_sentences: int = 2_000_000) -> str:
  """Trains a byte-fallback SentencePiece model on the documents; returns `<output>.model`.

  output: a path prefix; writes `<output>.model` and `<output>.vocab` (atomically: a failed
  run leaves no partial model behind).
  """
  if model_type not in ("bpe", "unigram"):
    raise DataError(f"tokenizer model_type={model_type!r} is not supported; fix: use 'bpe' "
                    "or 'unigram'")
  if vocab_size < 260:
    raise DataError(f"tokenizer vocab_size={vocab_size} is too small for byte fallback (256 "
                    "byte pieces + 4 specials); fix: use --vocab_size >= 260")
  directory = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
    raise DataError(f"tokenizer output {output!r}: directory {directory} does not exist or is "
                    "not writable; fix: create it or pick another --output")
  sentences = _sentences(documents)
  first = next(sentences, None)
  if first is None:
    raise DataError("tokenizer input holds no text; fix: point --input at non-empty files")
  tmp = f"{output}.tmp{os.getpid()}"

  def all_sentences():
    yield first
    yield from sentences

  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=all_sentences(), model_prefix=tmp, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=0.9995,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        split_digits=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    for ext in (".model", ".vocab"):
      if os.path.exists(tmp + ext):
        os.remove(tmp + ext)
    reason = str(e).strip().splitlines()[-1]
    raise DataError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model "
                    f"({reason}); fix: lower --vocab_size or give more text") from None
  for ext in (".model", ".vocab"):
    os.replace(tmp + ext, output + ext)
  return output + ".model"


def load_tokenizer(path: str) -> spm.SentencePieceProcessor:
  if not path:
    raise DataError("data.tokenizer is empty but data.task='text' needs one; fix: set "
                    "--config.data.tokenizer=path/to/x.model (train one with `taipan "
                    "tokenizer train`)")
  if not os.path.isfile(path):
    raise DataError(f"tokenizer file {path!r} does not exist; fix: train one with `taipan "
                    "tokenizer train --input=... --output=...` or correct data.tokenizer")
  sp = spm.SentencePieceProcessor()
  try:
    sp.Load(path)
  except (RuntimeError, OSError) as e:
    raise DataError(f"tokenizer file {path!r} is not a SentencePiece model ({e}); fix: point "
                    "data.tokenizer at a .model file") from None
  return sp


def check_vocab(sp: spm.SentencePieceProcessor, vocab_size: int, path: str = "") -> None:
  """The model's vocabulary must be the tokenizer's, id for id."""
  if sp.GetPieceSize() != vocab_size:
    raise DataError(f"tokenizer {path!r} has {sp.GetPieceSize()} pieces but "
                    f"model.vocab_size={vocab_size}; fix: set "
                    f"--config.model.vocab_size={sp.GetPieceSize()} or use the tokenizer the "
                    "model was trained with")
