"""Input data: embedded synthetic tasks, local text corpora, sentencepiece, grain pipelines."""
from taipan_jax.data.errors import DataError
from taipan_jax.data.pipeline import make_eval_batches, make_train_iterator
from taipan_jax.data.synthetic import copy_example, mqar_example

__all__ = ["DataError", "copy_example", "make_eval_batches", "make_train_iterator",
           "mqar_example"]
