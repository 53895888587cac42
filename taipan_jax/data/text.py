"""Local text corpora as random-access document sources for grain.

`data.path` is a file, a directory (searched recursively) or a glob. Files ending in
`.jsonl` hold one JSON document per line (its text under `data.text_field`); files ending in
`.array_record` hold one UTF-8 document per record; any other file is one plain-text
document. A directory contributes its `.txt`, `.jsonl` and `.array_record` files.

Text is decoded strictly as UTF-8: a file in another encoding, or a binary file a glob
happened to match, stops the run with its name and the byte offset, instead of training on
replacement characters. Plain-text and JSON-lines files are checked when indexed, before any
training starts.
"""
from __future__ import annotations

import glob
import json
import os
import zlib

import numpy as np

from taipan_jax.data.errors import DataError

_DIRECTORY_SUFFIXES = (".txt", ".jsonl", ".array_record")


def resolve_files(path: str) -> list[str]:
  """A file, directory or glob -> the sorted list of files it names (never empty)."""
  if not path:
    raise DataError("data.path is empty but data.task='text' reads files; fix: set "
                    "--config.data.path to a file, a directory or a glob")
  if os.path.isdir(path):
    files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names
             if f.endswith(_DIRECTORY_SUFFIXES)]
    if not files:
      raise DataError(f"data.path={path!r} is a directory with no {'/'.join(_DIRECTORY_SUFFIXES)}"
                      " files; fix: point it at the files or a glob such as 'dir/**/*.md'")
  elif os.path.isfile(path):
    files = [path]
  else:
    files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
    if not files:
      raise DataError(f"data.path={path!r} matches no file; fix: check the path (globs such "
                      "as 'dir/**/*.txt' are allowed)")
  return sorted(files)


class TextDocuments:
  """A grain RandomAccessDataSource of documents (str) over local files.

  Indexing happens once, at construction: a `.jsonl` file is scanned for line offsets, an
  ArrayRecord file for its record count. Files are opened lazily in each reader (grain
  worker processes receive a pickled copy).
  """

  def __init__(self, path: str, text_field: str = "text"):
    self.text_field = text_field
    self._readers = {}
    self._entries = []          # (kind, file, offset or record index)
    for f in resolve_files(path):
      if f.endswith(".jsonl"):
        start = len(self._entries)
        offset = 0
        with open(f, "rb") as fh:
          for line in fh:
            if line.strip():
              _check_text(f, line, offset)
              self._entries.append(("jsonl", f, offset))
            offset += len(line)
        if len(self._entries) > start:
          self[start]       # a wrong text_field fails here, before any training starts
      elif f.endswith(".array_record"):
        n = len(self._array_record(f))
        self._entries += [("array_record", f, i) for i in range(n)]
      else:
        if os.path.getsize(f) > 0:
          with open(f, "rb") as fh:
            _check_text(f, fh.read(), 0)
          self._entries.append(("text", f, 0))
    if not self._entries:
      raise DataError(f"data.path={path!r} holds no documents (all files are empty); fix: "
                      "point it at non-empty text")

  def _array_record(self, f):
    if f not in self._readers:
      from array_record.python.array_record_data_source import ArrayRecordDataSource
      self._readers[f] = ArrayRecordDataSource([f])
    return self._readers[f]

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> str:
    kind, f, where = self._entries[index]
    if kind == "text":
      with open(f, "rb") as fh:
        return _check_text(f, fh.read(), 0)
    if kind == "array_record":
      return _check_text(f"{f} record {where}", self._array_record(f)[where], 0)
    with open(f, "rb") as fh:
      fh.seek(where)
      line = fh.readline()
    try:
      record = json.loads(line)
      return str(record[self.text_field])
    except (json.JSONDecodeError, KeyError, TypeError):
      raise DataError(f"{f} at byte {where}: not a JSON object with a {self.text_field!r} "
                      "field; fix: set --config.data.text_field to the field that holds "
                      "the text") from None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = {}      # open readers do not travel to worker processes
    return state

  def __repr__(self) -> str:
    return f"TextDocuments({len(self)} documents)"


def _check_text(name: str, data: bytes, offset: int) -> str:
  """data decoded as UTF-8; a DataError naming the file and byte offset if it is not text."""
  nul = data.find(b"\0")
  if nul >= 0:
    raise DataError(f"{name} holds a NUL byte at byte {offset + nul}: a binary file, not text; "
                    "fix: narrow data.path (or --input) to the text files")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{name} is not UTF-8 at byte {offset + e.start} "
                    f"({data[e.start:e.start + 4]!r}); fix: convert it (e.g. `iconv -f latin1 "
                    "-t utf-8`) or leave it out of data.path (or --input)") from None


def split_indices(num_documents: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """A stable train/held-out split of document indices: a document's side depends only on
  its index, so adding files at the end never moves a document between the two."""
  bucket = np.array([zlib.crc32(i.to_bytes(8, "little")) % 10_000
                     for i in range(num_documents)])
  held_out = bucket < int(round(eval_fraction * 10_000))
  if eval_fraction > 0 and not held_out.any():
    held_out[-1] = True           # tiny corpora still get one held-out document
  return np.nonzero(~held_out)[0], np.nonzero(held_out)[0]


def read_document_tokens(path: str, tokenizer, max_tokens: int) -> np.ndarray:
  """One long document as token ids [<= max_tokens] int32, for long-context evaluation.

  path: a `.npy` of token ids, or text (a file, directory or glob; several documents are read
  in sorted order and joined by newlines as one document), encoded with `tokenizer`.
  """
  if path.endswith(".npy"):
    if not os.path.isfile(path):
      raise DataError(f"token file {path!r} does not exist; fix: check --data")
    ids = np.load(path)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise DataError(f"{path!r} holds a {ids.dtype} array of shape {ids.shape}; fix: save "
                      "one document's token ids as a 1-D integer array")
    return ids[:max_tokens].astype(np.int32)
  if tokenizer is None:
    raise DataError(f"--data={path!r} is text but this model has no tokenizer (not a text "
                    "run); fix: pass a .npy of token ids")
  docs = TextDocuments(path)
  ids: list[int] = []
  for i in range(len(docs)):
    ids += tokenizer.EncodeAsIds(docs[i] + "\n")
    if len(ids) >= max_tokens:
      break
  if len(ids) < 2:
    raise DataError(f"--data={path!r} holds fewer than 2 tokens; fix: give a longer document")
  return np.asarray(ids[:max_tokens], np.int32)
