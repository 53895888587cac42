"""Hugging Face Mamba-2 checkpoints load into our model and give transformers' logits.

The fixtures under tests/fixtures/hf_mamba2 (regenerate: tests/fixtures/make_hf_mamba2.py)
are random `Mamba2ForCausalLM`s saved with save_pretrained, with their transformers fp32
logits. Where torch and transformers are installed, the same comparison also runs live.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from taipan_jax.interop import InteropError, load_hf_mamba2, upcycle_to_taipan
from helpers import jit_forward

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf_mamba2")
CASES = sorted(os.listdir(FIXTURES))


def _compare(model, tokens, expected, name):
  model.eval()
  ours, _ = jit_forward(model, jnp.asarray(tokens))
  ours = np.asarray(ours)
  assert ours.shape == expected.shape, (ours.shape, expected.shape)
  err = np.abs(ours - expected).max()
  print(f"\n{name}: max |logits - transformers| = {err:.2e} (|logits| max "
        f"{np.abs(expected).max():.2f})")
  assert err < 1e-4 * max(1.0, np.abs(expected).max())
  np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("case", CASES)
def test_fixture_logits_match_transformers(case):
  model, cfg = load_hf_mamba2(os.path.join(FIXTURES, case))
  data = np.load(os.path.join(FIXTURES, case, "expected.npz"))
  assert cfg.model.vocab_size == data["logits"].shape[-1]
  _compare(model, data["tokens"], data["logits"], case)


def test_live_against_transformers(tmp_path):
  torch = pytest.importorskip(
      "torch", reason="needs torch and transformers (pip install torch transformers): "
      "compares against a Mamba2ForCausalLM built in the test")
  transformers = pytest.importorskip("transformers", reason="needs transformers")
  torch.manual_seed(123)
  config = transformers.Mamba2Config(
      vocab_size=91, hidden_size=48, num_hidden_layers=2, state_size=12, head_dim=12,
      num_heads=8, n_groups=2, expand=2, conv_kernel=3, chunk_size=8, use_bias=False,
      tie_word_embeddings=False)
  hf = transformers.Mamba2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.add_(0.05 * torch.randn_like(p)) if not name.endswith("A_log") else p.copy_(
          torch.log(torch.rand_like(p) * 7 + 1))
  hf.save_pretrained(tmp_path, safe_serialization=True)
  tokens = np.random.default_rng(5).integers(0, 91, (3, 29))
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.float().numpy()
  model, _ = load_hf_mamba2(str(tmp_path))
  _compare(model, tokens, expected, "live")


def _copy_fixture(tmp_path, case="tied_one_group"):
  dst = tmp_path / case
  shutil.copytree(os.path.join(FIXTURES, case), dst)
  return dst


def _rewrite_tensors(path, edit):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.update({"backbone.layers.0.mixer.extra": np.zeros(3, np.float32)}),
     "backbone.layers.0.mixer.extra .* has no place"),
    (lambda t: t.pop("backbone.layers.1.mixer.D"), "no tensor for 1 of our parameters"),
    (lambda t: t.update({"backbone.layers.0.mixer.dt_bias": np.zeros(5, np.float32)}),
     "backbone.layers.0.mixer.dt_bias has shape"),
    (lambda t: t.update({"backbone.layers.7.mixer.D": np.zeros(8, np.float32)}),
     "maps to layers.7.mixer.D, which our model"),
])
def test_bad_checkpoints_name_the_tensor(tmp_path, edit, message):
  path = _copy_fixture(tmp_path)
  _rewrite_tensors(path, edit)
  with pytest.raises(InteropError, match=message):
    load_hf_mamba2(str(path))


def test_unsupported_config_is_refused(tmp_path):
  path = _copy_fixture(tmp_path)
  config = json.loads((path / "config.json").read_text())
  config["time_step_limit"] = [0.0, 0.1]
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(InteropError, match="time_step_limit"):
    load_hf_mamba2(str(path))


@pytest.mark.parametrize("case,sal_every", [("tied_one_group", 1), ("untied_two_groups", 3)])
def test_upcycled_taipan_starts_equal_to_its_mamba2(case, sal_every):
  source, cfg = load_hf_mamba2(os.path.join(FIXTURES, case))
  taipan, tcfg = upcycle_to_taipan(source, cfg, sal_every=sal_every,
                                   overrides={"sal.head_dim": 16, "sal.window": 16})
  assert tcfg.model.pattern == "m" * sal_every + "s" and taipan.num_sal >= 1
  tokens = np.load(os.path.join(FIXTURES, case, "expected.npz"))["tokens"]
  source.eval()
  taipan.eval()
  a, _ = jit_forward(source, jnp.asarray(tokens))
  b, aux = jit_forward(taipan, jnp.asarray(tokens), return_masks=True)
  # Evaluation selects as training does: the closed gate picks about closed_fraction (1e-3)
  # of the tokens, each moved 1e-3 of the way to its attention output (eq. 5). Before a SAL
  # first selects a token the logits are the Mamba-2's exactly; after it, within that mix.
  masks = np.asarray(aux["select_masks"])                       # [num_sal, batch, seq]
  assert masks.mean() < 0.05          # a few tokens of a short fixture
  first = np.where(masks.max(0).any(-1), masks.max(0).argmax(-1), tokens.shape[1])  # [batch]
  err = float(jnp.abs(a - b).max())
  print(f"\n{case} upcycled every {sal_every}: max |taipan - mamba2| = {err:.2e}, "
        f"selected {masks.mean():.4f}")
  for r, t in enumerate(first):
    np.testing.assert_array_equal(np.asarray(a[r, :t]), np.asarray(b[r, :t]))
  assert err <= 1e-2 * float(jnp.abs(a).max())
  # Training reaches the new gates: the straight-through gradient and the budget loss.
  taipan.train()
  graphdef, params, rest = nnx.split(taipan, nnx.Param, ...)

  def loss(params):
    logits, aux = nnx.merge(graphdef, params, rest)(jnp.asarray(tokens),
                                                     gumbel_key=jax.random.key(0))
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 1]) + aux["budget_loss"]

  grads = jax.jit(jax.grad(loss))(params)
  sal = sal_every     # index of the first SAL
  assert float(jnp.abs(grads["layers"][sal]["gate"]["out"]["kernel"][...]).max()) > 0
  assert float(jnp.abs(grads["layers"][sal]["gate"]["out"]["bias"][...]).max()) > 0


def test_convert_command_writes_a_workdir_train_resumes(tmp_path):
  from taipan_jax import cli
  from trainer_helpers import losses
  work = tmp_path / "w"

  def taipan(*args):        # the command in this process: its exit code (returning is 0)
    try:
      cli.main(["taipan", *args])
    except SystemExit as e:
      return e.code or 0
    return 0

  assert taipan("convert", f"--hf_dir={FIXTURES}/tied_one_group", f"--workdir={work}",
                "--upcycle_sal_every=1") == 0
  assert (work / "checkpoints" / "0").is_dir() and (work / "config.json").is_file()
  assert taipan("train", f"--config={work / 'config.json'}", f"--workdir={work}",
                "--config.data.seq_len=16", "--config.data.num_kv_pairs=2",
                "--config.train.batch_size=8", "--config.train.steps=2",
                "--config.train.log_every=1") == 0
  assert sorted(losses(work)) == [1, 2]


def test_state_spaces_layout_from_a_torch_pickle(tmp_path):
  """state-spaces/mamba2-* snapshots: pytorch_model.bin, MambaConfig keys, padded rows."""
  torch = pytest.importorskip(
      "torch", reason="needs torch (pip install torch): writes and reads pytorch_model.bin")
  from safetensors.numpy import load_file
  case = "tied_one_group"
  hf_config = json.loads(open(os.path.join(FIXTURES, case, "config.json")).read())
  tensors = load_file(os.path.join(FIXTURES, case, "model.safetensors"))
  embed = tensors.pop("backbone.embeddings.weight")
  rows = -(-embed.shape[0] // 16) * 16          # state-spaces pads the embedding itself
  tensors["backbone.embedding.weight"] = np.pad(embed, [(0, rows - embed.shape[0]), (0, 0)])
  tensors.pop("lm_head.weight", None)
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
             tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text(json.dumps({
      "d_model": hf_config["hidden_size"], "n_layer": hf_config["num_hidden_layers"],
      "vocab_size": hf_config["vocab_size"], "rms_norm": True, "residual_in_fp32": True,
      "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True,
      "ssm_cfg": {"layer": "Mamba2", "d_state": hf_config["state_size"],
                  "headdim": hf_config["head_dim"], "ngroups": hf_config["n_groups"],
                  "d_conv": hf_config["conv_kernel"], "expand": hf_config["expand"],
                  "chunk_size": hf_config["chunk_size"]}}))
  model, _ = load_hf_mamba2(str(tmp_path))
  data = np.load(os.path.join(FIXTURES, case, "expected.npz"))
  _compare(model, data["tokens"], data["logits"], "state-spaces layout")
