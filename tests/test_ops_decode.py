"""The decode ops routed to their Triton kernels (interpret mode off a GPU): 'auto' follows
each op's measured rule, $TAIPAN_KERNELS overrides, and every route gives the same result."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import taipan_jax
from pallas_kernels.decode.reference import (mamba2_in_proj_reference, mamba2_ssm_out_reference,
                                             norm_matvec_reference, window_attention_reference)
from taipan_jax import ops
from taipan_jax.ops.decode import KERNELS as DECODE_KERNELS

ON_GPU = jax.default_backend() == "gpu"


def _err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


def test_kernels_env_routes_decode_ops(monkeypatch):
  kernels = DECODE_KERNELS
  monkeypatch.setenv("TAIPAN_KERNELS", "pallas")
  monkeypatch.setenv("TAIPAN_INTERPRET", "1")
  assert ops.choose(kernels) == ops.Route("pallas", "gpu", True)
  monkeypatch.setenv("TAIPAN_KERNELS", "xla")
  assert ops.choose(kernels) == ops.Route("xla")
  monkeypatch.delenv("TAIPAN_KERNELS")
  monkeypatch.delenv("TAIPAN_INTERPRET")
  assert ops.choose(kernels, head_dim=64, d_state=128) == (
      ops.Route("pallas", "gpu") if ON_GPU else ops.Route("xla"))
  if ON_GPU:
    assert ops.choose(kernels, "pallas", head_dim=64, d_state=128) == ops.Route("pallas", "gpu")
    with pytest.raises(ValueError, match="cannot tile"):
      ops.choose(kernels, "pallas", head_dim=48)
  else:
    with pytest.raises(ValueError, match="no Pallas decode kernel for platform"):
      ops.choose(kernels, "pallas", head_dim=64, d_state=128)


def test_block_kernels_dispatch_by_batch(monkeypatch, rng):
  """'auto' takes the Mamba-2 block kernels on a GPU for one row and XLA for more (as
  measured), and norm_matvec's only up to k = 2048; the backend is faked as a GPU and the
  kernels run in interpret mode."""
  import pallas_kernels.decode.mamba2_in_proj as in_module
  import pallas_kernels.decode.mamba2_ssm_out as out_module
  import pallas_kernels.decode.norm_matvec as matvec_module
  calls = []
  for module, name in ((matvec_module, "norm_matvec_gpu"), (in_module, "mamba2_in_proj_gpu"),
                       (out_module, "mamba2_ssm_out_gpu")):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: (
        calls.append(name), real(*a, **{**k, "interpret": True}))[1])
  monkeypatch.delenv("TAIPAN_KERNELS", raising=False)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  heads, head_dim, d_state, d = 2, 16, 16, 24
  d_inner, conv_dim = heads * head_dim, heads * head_dim + 2 * d_state
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  for b, kernel in ((1, True), (2, False)):
    calls.clear()
    x = normal(b, d)
    got = ops.norm_matvec(x, jnp.ones(d), jnp.ones((d, 8)), eps=1e-5, dtype=jnp.float32)
    want = norm_matvec_reference(x, jnp.ones(d), jnp.ones((d, 8)), eps=1e-5, dtype=jnp.float32)
    assert _err(got, np.asarray(want, np.float64)) < 1e-5
    args = (x, jnp.ones(d), normal(d_inner + conv_dim + heads, d), normal(b, 3, conv_dim),
            normal(4, conv_dim), normal(conv_dim))
    kw = dict(eps=1e-5, dtype=jnp.float32, d_inner=d_inner)
    got = ops.mamba2_in_proj(*args, **kw)
    for g, w in zip(got, mamba2_in_proj_reference(*args, **kw)):
      assert _err(g, np.asarray(w, np.float64)) < 1e-5
    args = (got[0], normal(b, heads, head_dim, d_state), normal(heads), normal(heads),
            normal(heads), jnp.ones(d_inner), normal(d_inner, d), x)
    kw = dict(eps=1e-5, dtype=jnp.float32, group_size=d_inner, heads=heads, head_dim=head_dim,
              n_groups=1, d_state=d_state)
    got = ops.mamba2_ssm_out(*args, **kw)
    for g, w in zip(got, mamba2_ssm_out_reference(*args, **kw)):
      assert _err(g, np.asarray(w, np.float64)) < 1e-5
    assert calls == (["norm_matvec_gpu", "mamba2_in_proj_gpu", "mamba2_ssm_out_gpu"]
                     if kernel else []), b
  calls.clear()
  ops.norm_matvec(jnp.ones((1, 4096)), jnp.ones(4096), jnp.ones((4096, 8)), eps=1e-5,
                  dtype=jnp.float32)
  assert calls == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_decode_with_the_kernels_equals_the_jnp_path(dtype):
  """Taipan's decode steps with mamba.kernel and sal.kernel 'pallas' (off a GPU in interpret
  mode: the decode kernels, and the prefill's TPU SSD and selective attention kernels;
  compiled on a GPU) against 'xla': logits and caches."""
  results = {}
  kernels = ("xla", "pallas")
  for kernel in kernels:
    interpret = kernel == "pallas" and not ON_GPU
    cfg = taipan_jax.load_config("tiny", {"model.dtype": dtype, "mamba.kernel": kernel,
                                          "sal.kernel": kernel, "mamba.interpret": interpret,
                                          "sal.interpret": interpret})
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 9)),
                         jnp.int32)
    model = taipan_jax.build_model(cfg, rngs=nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, p: nnx.merge(graphdef, s)(p, return_cache=True)[2])
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).step(t, c))
    cache = prefill(state, prompt)
    logits = []
    token = prompt[:, -1]
    for _ in range(5):
      out, cache = step(state, token, cache)
      logits.append(out)
      token = jnp.argmax(out, -1).astype(jnp.int32)
    results[kernel] = (jnp.stack(logits), cache)
  (want, want_cache), (got, got_cache) = (results[k] for k in kernels)
  tol = 1e-4 if dtype == "float32" and not ON_GPU else 5e-2
  assert _err(got, np.asarray(want, np.float64)) < tol
  for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      assert _err(a, np.asarray(jnp.asarray(b, jnp.float32), np.float64)) < tol


def test_decode_attention_dispatch(monkeypatch):
  """'auto' takes the kernel on a GPU at any cache length, XLA on other backends;
  $TAIPAN_KERNELS overrides. Each route gives the same result."""
  import pallas_kernels.decode.window_attention as kernel_module
  rng = np.random.default_rng(0)
  calls = []
  real = kernel_module.window_attention_gpu
  monkeypatch.setattr(kernel_module, "window_attention_gpu",
                      lambda *a, **k: calls.append(k["interpret"]) or real(*a, **k))
  monkeypatch.delenv("TAIPAN_KERNELS", raising=False)
  for slots, env, kernel in ((64, None, ON_GPU), (8192, None, ON_GPU),
                             (64, "pallas", True), (64, "xla", False)):
    if env:
      monkeypatch.setenv("TAIPAN_KERNELS", env)
      monkeypatch.setenv("TAIPAN_INTERPRET", str(int(env == "pallas" and not ON_GPU)))
    q = jnp.asarray(rng.standard_normal((1, 2, 16)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((1, slots, 2, 16)), jnp.float32)
    valid = jnp.arange(slots)[None] < 40
    calls.clear()
    got = ops.window_decode_attention(q, kv, kv, valid, active=jnp.ones((1,), bool))
    assert bool(calls) == kernel, (slots, env)
    want = window_attention_reference(q, kv, kv, valid)
    assert _err(got, np.asarray(want, np.float64)) < 1e-5, (slots, env)
