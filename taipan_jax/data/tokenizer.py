"""Tokenizers: train a SentencePiece model on local text, load one, check it against a config.

`data.tokenizer` is a SentencePiece `.model` (what `taipan tokenizer train` writes) or a
Hugging Face `tokenizer.json` (the `tokenizers` library: e.g. the Llama-3 tokenizer the paper
used). Both are used through SentencePiece's method names (EncodeAsIds, DecodeIds,
GetPieceSize, bos_id, eos_id).

Ids of the models trained here follow SentencePiece's defaults with padding added: 0 <pad>,
1 <unk>, 2 <s>, 3 </s>. Padding is id 0 so that packed rows padded with zeros decode as
padding; padded positions are masked, so another tokenizer's id 0 is harmless.
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
                    model_type: str = "bpe", max_sentences: int = 2_000_000,
                    overwrite: bool = False) -> str:
  """Trains a byte-fallback SentencePiece model on the documents; returns `<output>.model`.

  output: a path prefix; writes `<output>.model` and `<output>.vocab` (atomically: a failed
  run leaves no partial model behind). An existing model there is replaced only with
  `overwrite` (runs that point at it would silently decode with another tokenizer).
  """
  if not overwrite and os.path.exists(output + ".model"):
    raise DataError(f"tokenizer output {output + '.model'!r} exists; fix: pick another "
                    "--output, or pass --overwrite to replace it")
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
    fix = ("lower --vocab_size or give more text" if "vocab" in reason.lower()
           else "check that --input is plain UTF-8 text")
    raise DataError(f"sentencepiece could not train a {vocab_size}-piece {model_type} model "
                    f"({reason}); fix: {fix}") from None
  for ext in (".model", ".vocab"):
    os.replace(tmp + ext, output + ext)
  return output + ".model"


# Begin/end-of-text tokens of common Hugging Face tokenizers, most specific first.
_HF_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|endoftext|>")
_HF_EOS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


class HFTokenizer:
  """A Hugging Face `tokenizer.json` behind SentencePiece's method names."""

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer
    except ImportError:
      raise DataError(f"data.tokenizer={path!r} is a Hugging Face tokenizer.json, which needs "
                      "the `tokenizers` library; fix: pip install 'taipan-jax[hf]'") from None
    self.path = path
    try:
      self._tok = Tokenizer.from_file(path)
    except Exception as e:      # the library raises plain Exception for a bad file
      raise DataError(f"tokenizer file {path!r} is not a Hugging Face tokenizer.json ({e}); "
                      "fix: point data.tokenizer at a tokenizer.json or a SentencePiece "
                      ".model file") from None
    self._bos = self._special(_HF_BOS, "beginning")
    self._eos = self._special(_HF_EOS, "end")

  def _special(self, names, which):
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return i
    raise DataError(f"tokenizer {self.path!r} has none of the {which}-of-text tokens "
                    f"{list(names)}; fix: add one to the tokenizer.json's added_tokens")

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def EncodeAsIds(self, text: str) -> list[int]:   # noqa: N802  (SentencePiece's names)
    return self._tok.encode(text, add_special_tokens=False).ids

  def DecodeIds(self, ids) -> str:   # noqa: N802
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def GetPieceSize(self) -> int:   # noqa: N802
    return self._tok.get_vocab_size(with_added_tokens=True)

  def bos_id(self) -> int:
    return self._bos

  def eos_id(self) -> int:
    return self._eos


def load_tokenizer(path: str):
  """A SentencePiece `.model` or a Hugging Face `tokenizer.json` (by its content)."""
  if not path:
    raise DataError("data.tokenizer is empty but data.task='text' needs one; fix: set "
                    "--config.data.tokenizer=path/to/x.model (train one with `taipan "
                    "tokenizer train`)")
  if not os.path.isfile(path):
    raise DataError(f"tokenizer file {path!r} does not exist; fix: train one with `taipan "
                    "tokenizer train --input=... --output=...` or correct data.tokenizer")
  with open(path, "rb") as f:
    if f.read(1) == b"{":         # JSON: SentencePiece models are protobuf
      return HFTokenizer(path)
  sp = spm.SentencePieceProcessor()
  try:
    sp.Load(path)
  except (RuntimeError, OSError) as e:
    raise DataError(f"tokenizer file {path!r} is not a SentencePiece model ({e}); fix: point "
                    "data.tokenizer at a .model file or a Hugging Face tokenizer.json") from None
  return sp


def check_vocab(sp, vocab_size: int, path: str = "") -> None:
  """The model's vocabulary must be the tokenizer's, id for id."""
  if sp.GetPieceSize() != vocab_size:
    raise DataError(f"tokenizer {path!r} has {sp.GetPieceSize()} pieces but "
                    f"model.vocab_size={vocab_size}; fix: set "
                    f"--config.model.vocab_size={sp.GetPieceSize()} or use the tokenizer the "
                    "model was trained with")
