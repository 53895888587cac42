"""A Hugging Face tokenizer.json as data.tokenizer: built here with the `tokenizers` library."""
import json

import numpy as np
import pytest

import taipan_jax
from taipan_jax.data import make_train_iterator
from taipan_jax.data.errors import DataError
from taipan_jax.data.tokenizer import HFTokenizer, check_vocab, load_tokenizer

tokenizers = pytest.importorskip(
    "tokenizers", reason="needs the `tokenizers` library: pip install 'taipan-jax[hf]'")

SPECIALS = ["<pad>", "<unk>", "<|begin_of_text|>", "<|end_of_text|>"]


def _build(path, texts, specials=SPECIALS):
  """A byte-level BPE tokenizer.json, as Llama-3's is, trained on texts."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path))
  return tok


def test_a_tokenizer_json_encodes_like_the_library_and_feeds_the_pipeline(tmp_path):
  texts = [f"document {i}: " + "alpha beta gamma café " * (3 + i) for i in range(10)]
  (tmp_path / "corpus").mkdir()
  for i, t in enumerate(texts):
    (tmp_path / "corpus" / f"d{i}.txt").write_text(t)
  lib = _build(tmp_path / "tokenizer.json", texts)
  tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert isinstance(tok, HFTokenizer)
  assert tok.EncodeAsIds(texts[3]) == lib.encode(texts[3], add_special_tokens=False).ids
  assert tok.DecodeIds(tok.EncodeAsIds(texts[3])) == texts[3]
  assert (tok.bos_id(), tok.eos_id()) == (2, 3)
  size = lib.get_vocab_size(with_added_tokens=True)
  assert tok.GetPieceSize() == size
  with pytest.raises(DataError, match=f"set --config.model.vocab_size={size}"):
    check_vocab(tok, size + 1, "tokenizer.json")
  cfg = taipan_jax.load_config("tiny", {
      "data.task": "text", "data.path": str(tmp_path / "corpus"),
      "data.tokenizer": str(tmp_path / "tokenizer.json"), "model.vocab_size": size,
      "data.seq_len": 24, "train.batch_size": 4, "data.eval_fraction": 0.1})
  batch = next(make_train_iterator(cfg))
  tokens, ids = batch["tokens"], batch["example_ids"]
  # Every document starts with the tokenizer's own begin-of-text id, then its text's ids.
  starts = np.r_[True, ids[0, 1:] != ids[0, :-1]]
  assert (tokens[0][starts[:tokens.shape[1]]][1:] == tok.bos_id()).all()
  first_doc = int(ids[0, 0])
  want = [tok.bos_id(), *tok.EncodeAsIds(texts[first_doc])][:24]
  got = tokens[0][ids[0] == first_doc][:len(want)].tolist()
  assert got == want[:len(got)]


def test_a_tokenizer_json_without_begin_of_text_is_refused(tmp_path):
  _build(tmp_path / "tokenizer.json", ["alpha beta"] * 20, specials=["<pad>", "<unk>"])
  with pytest.raises(DataError, match="beginning-of-text tokens"):
    load_tokenizer(str(tmp_path / "tokenizer.json"))
  (tmp_path / "broken.json").write_text(json.dumps({"not": "a tokenizer"}))
  with pytest.raises(DataError, match="is not a Hugging Face tokenizer.json"):
    load_tokenizer(str(tmp_path / "broken.json"))
