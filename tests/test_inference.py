"""Generation and long-context evaluation (issue 9): they reproduce the parallel forward."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import (build, compiled_forward, jit_forward, random_tokens, randomize_gates,
                     tiny_config)
from taipan_jax import ops
from taipan_jax.data.tokenizer import train_tokenizer
from taipan_jax.inference import GenerationError, Generator, Sampling, sample_logits
from taipan_jax.inference.long_context import (bucket_table, fresh_start_control,
                                               position_buckets, stream_nll)
from trainer_helpers import SMALL


def _cli(capsys, *args):
  """`taipan <args>` in this process (no interpreter start): (exit code, stdout, stderr)."""
  from taipan_jax import cli
  try:
    cli.main(["taipan", *args])
    code = 0
  except SystemExit as e:
    code = e.code or 0
  captured = capsys.readouterr()
  return code, captured.out, captured.err

LAYER_KINDS = {
    "mamba2": dict(model__pattern="m"),
    "attention": dict(model__pattern="a"),
    "sal": dict(model__pattern="s", sal__window=5),
    "taipan": dict(sal__window=7),
    "kv_selected_only": dict(sal__kv_selected_only=True, sal__window=6),
    "inference_cap": dict(sal__inference_capacity=2, sal__window=6),
}


def _model(rng, variant):
  model = build(tiny_config(**LAYER_KINDS[variant]))
  randomize_gates(model, rng)
  model.eval()
  return model


@pytest.mark.parametrize("variant", ["mamba2", "attention", "sal", "taipan"])
def test_greedy_generation_is_the_argmax_of_the_parallel_forward(rng, variant):
  """Prompts of different lengths in one batch: every generated token is the argmax of the
  parallel forward over prompt + what came before it."""
  model = _model(rng, variant)
  prompts = [np.asarray(random_tokens(rng, 1, n)[0]) for n in (9, 1, 4)]
  out = Generator(model).generate(prompts, max_new_tokens=11)
  # One compiled forward: each sequence padded at the end to 20 tokens, which a causal
  # model's earlier positions do not see.
  forward = compiled_forward(model)
  for prompt, new in zip(prompts, out):
    assert len(new) == 11
    full = np.zeros((1, 20), np.int32)
    full[0, :prompt.size + 11] = np.concatenate([prompt, new])
    logits, _ = forward(jnp.asarray(full))
    argmax = np.asarray(jnp.argmax(logits[0], -1))[prompt.size - 1:prompt.size + 10]
    np.testing.assert_array_equal(argmax, new)


def test_stop_tokens_end_rows_and_stream_chunks_add_up(rng):
  model = _model(rng, "taipan")
  prompts = [[3, 4, 5], [6]]
  gen = Generator(model)
  free = gen.generate(prompts, max_new_tokens=12)
  stop = free[0][4]                      # the 5th token of row 0 becomes a stop token
  stopped = gen.generate(prompts, max_new_tokens=12, stop_tokens=[stop])
  assert stopped[0] == free[0][:free[0].index(stop) + 1]
  assert stopped[1] == free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
  chunks = list(gen.stream(prompts, max_new_tokens=12, chunk=5))
  assert len(chunks) > 1
  assert [sum((c[i] for c in chunks), []) for i in range(2)] == free


def test_sampling_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
  key = jax.random.key(0)
  draw = lambda **kw: np.asarray(sample_logits(logits, key, Sampling(**kw)))
  assert (draw(temperature=0.0) == 0).all()
  assert (draw(temperature=1.0, top_k=1) == 0).all()
  assert set(draw(temperature=1.0, top_k=2)) == {0, 1}
  # top_p 0.7: tokens 0 and 1 (0.5 < 0.7, 0.8 >= 0.7); top_p 0.85: tokens 0..2.
  assert set(draw(temperature=1.0, top_p=0.7)) == {0, 1}
  assert set(draw(temperature=1.0, top_p=0.85)) == {0, 1, 2}
  freq = np.bincount(draw(temperature=1.0), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  with pytest.raises(GenerationError, match="top_p"):
    Sampling(top_p=0.0)


@pytest.mark.optimized       # 10,000 decode steps: run time, not compile time (conftest)
def test_cache_size_is_the_same_after_100_and_10000_tokens(rng):
  model = _model(rng, "taipan")
  gen = Generator(model)
  sizes = {}
  for n in (100, 10_000):
    out = gen.generate([[1, 2, 3]], max_new_tokens=n)
    assert len(out[0]) == n
    sizes[n] = gen.cache_bytes
  assert sizes[100] == sizes[10_000] > 0


def test_bad_generation_requests_are_refused(rng):
  model = _model(rng, "taipan")
  gen = Generator(model, max_prompt_len=8)
  with pytest.raises(GenerationError, match="prompt 1 is empty"):
    gen.generate([[1], []], max_new_tokens=2)
  with pytest.raises(GenerationError, match="max_prompt_len=8"):
    gen.generate([list(range(9))], max_new_tokens=2)
  with pytest.raises(GenerationError, match="outside"):
    gen.generate([[1, 100]], max_new_tokens=2)
  attention = Generator(_model(rng, "attention"))
  with pytest.raises(GenerationError, match="max_cache_len"):
    attention.generate([[1, 2]], max_new_tokens=300)


def _one_shot_nll(model, tokens):
  """tokens: [n] -> [n - 1] NLL of tokens[1:] from one parallel forward."""
  logits = jit_forward(model, jnp.asarray(tokens[:-1])[None])[0][0]
  target = jnp.asarray(tokens[1:])[:, None]
  return np.asarray(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, target, -1)[:, 0])


@pytest.mark.parametrize("variant", list(LAYER_KINDS))
def test_streaming_in_segments_equals_one_shot(rng, variant):
  model = _model(rng, variant)
  tokens = np.asarray(random_tokens(rng, 1, 61)[0])
  direct = _one_shot_nll(model, tokens)
  streamed = stream_nll(model, tokens, segment_len=13, log=None)
  np.testing.assert_allclose(streamed, direct, atol=2e-5, rtol=1e-5)


def test_fresh_start_control_compares_against_direct_forwards(rng):
  """Each row's two perplexities equal those of independent parallel forwards: the whole
  document's over the span, and the span's own document from position s (an empty cache);
  the carried state changes the second from the first."""
  model = _model(rng, "taipan")
  tokens = np.asarray(random_tokens(rng, 1, 61)[0])
  nll = stream_nll(model, tokens, segment_len=13, log=None)
  rows = fresh_start_control(model, tokens, nll, [20, 45], segment_len=13, probe=8)
  assert [(r["start"], r["to"]) for r in rows] == [(20, 28), (20, 60), (45, 53), (45, 60)]
  whole = _one_shot_nll(model, tokens)
  for r in rows:
    s, hi = r["start"], r["to"]
    alone = _one_shot_nll(model, tokens[s:])
    np.testing.assert_allclose(r["ppl_streamed"], np.exp(whole[s:hi].mean()), rtol=1e-5)
    np.testing.assert_allclose(r["ppl_fresh_cache"], np.exp(alone[:hi - s].mean()), rtol=1e-5)
  assert all(abs(r["ppl_streamed"] / r["ppl_fresh_cache"] - 1) > 1e-4 for r in rows)
  with pytest.raises(ValueError, match="inside the document"):
    fresh_start_control(model, tokens, nll, [60])


def test_position_buckets():
  assert position_buckets(5000) == [(0, 1024), (1024, 2048), (2048, 4096), (4096, 5000)]
  rows = bucket_table(np.log(np.full(3000, 2.0)))
  assert [r["tokens"] for r in rows] == [1024, 1024, 952]
  np.testing.assert_allclose([r["ppl"] for r in rows], 2.0)


@pytest.fixture(scope="module")
def text_workdir(tmp_path_factory):
  from taipan_jax import cli
  """A 2-step text run: a 280-piece tokenizer on a small corpus, the SMALL model."""
  root = tmp_path_factory.mktemp("text_run")
  words = [f"word{i}" for i in range(80)]
  gen = np.random.default_rng(0)
  corpus = root / "corpus"
  corpus.mkdir()
  for i in range(4):
    (corpus / f"{i}.txt").write_text("\n".join(" ".join(gen.choice(words, 12))
                                               for _ in range(100)))
  text = lambda: [p.read_text() for p in sorted(corpus.iterdir())]
  spm = train_tokenizer(text(), str(root / "spm"), vocab_size=280)
  workdir = root / "run"
  try:
    cli.main(["taipan", "train", f"--workdir={workdir}", *SMALL, "--config.train.steps=2",
              "--config.data.task=text", f"--config.data.path={corpus}",
              f"--config.data.tokenizer={spm}", "--config.model.vocab_size=280",
              "--config.data.eval_fraction=0.25"])
  except SystemExit as e:
    assert not e.code, f"training the fixture's model failed with exit code {e.code}"
  return root, workdir, corpus


def test_generate_and_long_context_commands(text_workdir, tmp_path, capsys):
  root, workdir, corpus = text_workdir
  code, out, err = _cli(capsys, "generate", f"--workdir={workdir}", "--prompt=word1 word2",
                        "--max_new_tokens=8", "--temperature=0.7", "--top_p=0.9")
  assert code == 0, err[-2000:]
  assert out.strip(), "nothing was generated"
  stem = tmp_path / "lc"
  code, out, err = _cli(capsys, "eval", f"--workdir={workdir}", "--long_context",
                        f"--data={corpus}", "--max_tokens=1500", "--segment_len=512",
                        "--fresh_starts=1100", f"--out={stem}")
  assert code == 0, err[-2000:]
  report = json.loads((tmp_path / "lc.json").read_text())
  assert report["tokens"] == 1500
  assert [b["to"] for b in report["buckets"]] == [1024, 1499]
  assert [(r["start"], r["to"]) for r in report["fresh_starts"]] == [(1100, 1499)]
  assert "from an empty cache at 1,100" in out
  assert (tmp_path / "lc.png").stat().st_size > 1000


def test_inference_input_errors_are_one_clear_line(text_workdir, tmp_path, capsys):
  root, workdir, corpus = text_workdir
  # Tokenizer mismatch: the config names a tokenizer of another vocabulary.
  texts = [p.read_text() for p in sorted(corpus.iterdir())]
  other = train_tokenizer(texts, str(tmp_path / "other"), vocab_size=278)
  # No checkpoint: a workdir with its config only.
  empty = tmp_path / "empty"
  empty.mkdir()
  shutil.copy(workdir / "config.json", empty / "config.json")
  cases = [
      (["generate", f"--workdir={workdir}", "--prompt=word1",
        f"--config.data.tokenizer={other}"], "278 pieces"),
      (["generate", f"--workdir={empty}", "--prompt=word1"], "no checkpoint in"),
      (["generate", f"--workdir={tmp_path / 'nowhere'}", "--prompt=x"], "no config.json"),
      (["generate", f"--workdir={workdir}", "--prompt="], "prompt 0 is empty"),
      (["eval", f"--workdir={workdir}", "--long_context"], "needs --data"),
      (["eval", f"--workdir={workdir}", "--long_context", f"--data={tmp_path}/none.txt"],
       "matches no file"),
      (["eval", f"--workdir={workdir}", "--long_context", f"--data={corpus}",
        "--fresh_starts=half"], "must be token positions"),
      (["eval", f"--workdir={workdir}", "--long_context", f"--data={corpus}",
        "--max_tokens=100000", "--fresh_starts=90000"], "the document has only"),
  ]
  for args, message in cases:
    code, _, err = _cli(capsys, *args)
    assert code == 2, (args, err[-1500:])
    last = err.strip().splitlines()[-1]
    assert last.startswith("taipan: error:") and message in last, (args, last)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="compiles the Pallas GPU kernels: run with JAX_PLATFORMS=cuda on a GPU")
def test_streaming_with_the_gpu_kernels_equals_one_shot(rng):
  """The segment path feeds the cached window to the selective attention kernel as a
  kv_select prefix and the SSM state to the SSD kernel as an initial state."""
  model = build(tiny_config(sal__window=24, sal__kernel="pallas", mamba__kernel="pallas"))
  randomize_gates(model, rng)
  model.eval()
  tokens = np.asarray(random_tokens(rng, 1, 300)[0])
  direct = _one_shot_nll(model, tokens)
  streamed = stream_nll(model, tokens, segment_len=64, log=None)
  np.testing.assert_allclose(streamed, direct, atol=1e-3, rtol=1e-3)


def test_lm_eval_scorer_in_batches_equals_a_direct_computation(text_workdir):
  """The adapter's scoring (no lm-eval needed): sequences of several lengths in batches of 3,
  one longer than max_length (streamed), against the model's own log-softmax over each
  unpadded sequence."""
  from taipan_jax.inference.lm_eval_adapter import Scorer
  from taipan_jax.inference.load import load_workdir
  _, workdir, _ = text_workdir
  scorer = Scorer(load_workdir(str(workdir), log=lambda _: None), max_length=64, batch_size=3)
  sp, bos = scorer.tokenizer, scorer.bos
  forward = compiled_forward(scorer.model)

  def direct(ids, n):
    padded = np.zeros((1, 256), np.int32)     # not the scorer's padding; causal: unseen
    padded[0, :len(ids)] = ids
    lp = np.asarray(jax.nn.log_softmax(forward(jnp.asarray(padded))[0][0], -1), np.float64)
    greedy = all(lp[t - 1].argmax() == ids[t] for t in range(len(ids) - n, len(ids)))
    return float(sum(lp[t - 1, ids[t]] for t in range(len(ids) - n, len(ids)))), greedy

  texts = ["word1 word2 word3", "word7", " ".join(f"word{i % 50}" for i in range(60)),
           "word4 word5 word6 word7 word8", "word9 word10"]
  sequences = [([bos] + sp.EncodeAsIds(t), k) for t, k in zip(texts, (2, 1, 30, 3, 2))]
  assert len(sequences[2][0]) > 64                   # streamed through the cache
  got = scorer.score(sequences)
  for (ids, n), (ll, greedy) in zip(sequences, got):
    want, want_greedy = direct(ids, n)
    np.testing.assert_allclose(ll, want, atol=1e-3, rtol=1e-5)
    if len(ids) <= 64:
      assert greedy == want_greedy
  text = scorer.generate("word1 word2", until=["word"], max_new_tokens=6)
  assert isinstance(text, str) and "word" not in text


def test_lm_eval_simple_evaluate_equals_a_direct_computation(text_workdir, tmp_path):
  """lm-evaluation-harness itself runs a multiple-choice task defined here over a local
  JSONL file through TaipanLM; its per-choice log-likelihoods and accuracy equal ours."""
  lm_eval = pytest.importorskip(
      "lm_eval", reason="needs lm-evaluation-harness: pip install 'taipan-jax[eval]'")
  from taipan_jax.inference.lm_eval_adapter import TaipanLM
  _, workdir, _ = text_workdir
  docs = [{"query": f"word{i} word{i + 1}", "choices": [f" word{i + 2}", f" word{i + 40}",
                                                        f" word{i + 3} word{i + 4}"],
           "gold": i % 3} for i in range(7)]
  data = tmp_path / "task.jsonl"
  data.write_text("".join(json.dumps(d) + "\n" for d in docs))
  task = {"task": "taipan_tiny_mc", "dataset_path": "json",
          "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
          "output_type": "multiple_choice", "doc_to_text": "{{query}}",
          "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
          "metric_list": [{"metric": "acc"}]}
  lm = TaipanLM(workdir=str(workdir), max_length=64, batch_size=4)
  result = lm_eval.simple_evaluate(model=lm, tasks=[task], log_samples=True,
                                   bootstrap_iters=0)
  samples = result["samples"]["taipan_tiny_mc"]
  sp, bos = lm.scorer.tokenizer, lm.scorer.bos
  forward = compiled_forward(lm.scorer.model)

  def direct(context, continuation):
    # lm-eval's rule for causal models: trailing spaces of the context go to the
    # continuation; the continuation's ids are the whole text's after the context's.
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = sp.EncodeAsIds(stripped)
    cont = sp.EncodeAsIds(stripped + continuation)[len(ctx):]
    ids = [bos] + ctx + cont
    padded = np.zeros((1, 64), np.int32)
    padded[0, :len(ids)] = ids
    lp = np.asarray(jax.nn.log_softmax(forward(jnp.asarray(padded))[0][0], -1), np.float64)
    return float(sum(lp[t - 1, ids[t]] for t in range(len(ids) - len(cont), len(ids))))

  correct, worst = 0, 0.0
  assert len(samples) == len(docs)
  for sample in samples:
    doc = sample["doc"]
    got = [float(r[0]) for r in sample["filtered_resps"]]
    want = [direct(*args) for args in sample["arguments"]]
    assert [a[1].strip() for a in sample["arguments"]] == [c.strip() for c in doc["choices"]]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    worst = max(worst, float(np.max(np.abs(np.subtract(got, want)))))
    correct += int(np.argmax(want) == doc["gold"])
  acc = result["results"]["taipan_tiny_mc"]["acc,none"]
  print(f"lm-eval {lm_eval.__version__}: acc {acc:.4f}, direct {correct}/{len(docs)}; "
        f"largest log-likelihood difference {worst:.2e} over {3 * len(docs)} choices")
  assert acc == pytest.approx(correct / len(docs))


@pytest.mark.parametrize("variant", ["taipan", "kv_selected_only"])
def test_sal_attention_maps_reproduce_the_attention_output(rng, variant):
  """The maps' weights applied to the values give the SAL's attention output, and with the
  maps' mix weight that output gives the SAL's whole output (eq. 5, then the SwiGLU)."""
  from taipan_jax.inference.inspect import sal_attention_maps
  model = _model(rng, variant)
  tokens = random_tokens(rng, 2, 40)
  maps = sal_attention_maps(model, tokens)
  assert len(maps) == model.num_sal
  selected = maps[0]["select"] > 0.5
  assert 0 < float(selected.mean()) < 1

  @nnx.jit          # compiled: eager op-by-op dispatch is slow on the CPU
  def attention(model, tokens, selected):
    # The first SAL's input: the layers before it, as in the forward pass.
    h = model.embed(tokens).astype(jnp.float32)
    first = model.kinds.index("s")
    for layer in model.layers[:first]:
      h = layer(h).h
    sal = model.layers[first]
    l = tokens.shape[1]
    q, k, v = sal._qkv(sal.norm_a(h), jnp.broadcast_to(jnp.arange(l), tokens.shape))
    out = ops.selective_window_attention(
        q, k, v, selected, window=sal.window,
        kv_select=selected if sal.kv_selected_only else None, implementation="xla")
    return out, v, h, sal(h, token_ids=tokens).h

  expected, v, h, sal_out = attention(model, tokens, selected)
  got = jnp.einsum("bhij,bjhd->bihd", maps[0]["weights"], v.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
  sal = model.layers[model.kinds.index("s")]
  mix = maps[0]["mix"]
  assert float(jnp.max(jnp.where(selected, 0.0, mix))) == 0.0     # unselected: untouched
  assert 0 < float(jnp.min(jnp.where(selected, mix, 1.0)))
  o = sal.o_proj(got.reshape(*got.shape[:2], -1)).astype(jnp.float32)
  mixed = h + mix[..., None] * (o - h)
  rebuilt = mixed + sal.mlp(sal.norm_b(mixed)).astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(sal_out), atol=1e-4)
