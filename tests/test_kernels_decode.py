"""The decode kernels (pallas_kernels/decode) against float64 numpy (the ops and the model
routed to them: test_ops_decode.py).

On the CPU the Triton kernels run in Pallas interpret mode, which fills memory a kernel never
writes with NaN, so an unwritten output block fails the comparison; with JAX_PLATFORMS=cuda
they are compiled. The kernels are inference-only (no gradients: nothing trains through a
decode step).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode.mamba2_in_proj import mamba2_in_proj_gpu
from pallas_kernels.decode.mamba2_ssm_out import mamba2_ssm_out_gpu
from pallas_kernels.decode.norm_matvec import norm_matvec_gpu
from pallas_kernels.decode.reference import (mamba2_in_proj_reference, mamba2_ssm_out_reference,
                                             norm_matvec_reference, ring_attention_reference,
                                             window_attention_reference)
from pallas_kernels.decode.window_attention import ring_attention_gpu, window_attention_gpu

ON_GPU = jax.default_backend() == "gpu"
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}   # relative to the output's largest entry
# The 190M-sized cases: their interpret-mode grids run for seconds, so they compile with XLA's
# optimizations (conftest); the small cases compile faster without.
OPTIMIZED = pytest.mark.optimized


def _round(a, dtype):
  """float64 -> dtype -> float64: the roundings the kernels make on purpose."""
  return np.asarray(jnp.asarray(a, jnp.float32).astype(dtype).astype(jnp.float32), np.float64)


def norm_matvec_numpy(x, nw, w, *, eps, dtype, gate=None, group_size=None, residual=None,
                      mix=None, product_dtypes=None):
  u = np.asarray(x, np.float64)
  if gate is not None:
    z = np.asarray(jnp.asarray(gate, jnp.float32), np.float64)[:, :u.shape[1]]
    u = u * z / (1 + np.exp(-z))
  b, k = u.shape
  if nw is not None:
    gs = group_size or k
    grouped = u.reshape(b, k // gs, gs)
    grouped = grouped / np.sqrt((grouped ** 2).mean(-1, keepdims=True) + eps)
    u = grouped.reshape(b, k) * np.asarray(nw, np.float64)
  xn = _round(u, dtype)
  ws = w if isinstance(w, tuple) else (w,)
  ys = tuple(xn @ _round(np.asarray(jnp.asarray(wi, jnp.float32), np.float64), pd)
             for wi, pd in zip(ws, product_dtypes or (dtype,) * len(ws)))
  if isinstance(w, tuple):
    return ys
  if residual is None:
    return ys[0]
  res = np.asarray(residual, np.float64)
  y = _round(ys[0], dtype)
  return res + y if mix is None else res + np.asarray(mix, np.float64)[:, None] * (y - res)


def _err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


NORM_MATVEC_CASES = [
    # b, k, n, gated, groups, residual, dtype, weight dtype, block_k, block_n
    (1, 64, 48, False, 1, False, jnp.float32, jnp.float32, 16, 16),      # n overhangs
    (1, 96, 200, True, 2, True, jnp.float32, jnp.float32, 32, 64),        # gated, 2 groups
    (3, 40, 17, False, 1, True, jnp.float32, jnp.float32, 32, 16),        # k overhangs
    (11, 48, 33, True, 3, True, jnp.bfloat16, jnp.float32, 16, 32),       # > MAX_ROWS rows
    (2, 768, 130, False, 1, False, jnp.bfloat16, jnp.bfloat16, 256, None),  # in-proj-like
    (1, 1536, 40, True, 1, True, jnp.bfloat16, jnp.bfloat16, 256, None),  # out-proj-like
    (2, 1536, 24, True, 2, True, jnp.float32, jnp.float32, 256, None),    # split, 2 groups
]


@pytest.mark.parametrize("case", NORM_MATVEC_CASES)
def test_norm_matvec_matches_float64(rng, case):
  b, k, n, gated, groups, residual, dtype, wdtype, bk, bn = case
  x = jnp.asarray(rng.standard_normal((b, k)) * 3, jnp.float32)
  # A gate wider than k: its first k columns count (the model passes all of zxbcdt).
  gate = jnp.asarray(rng.standard_normal((b, k + 7)), dtype) if gated else None
  nw = jnp.asarray(1 + 0.3 * rng.standard_normal(k), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), wdtype)
  res = jnp.asarray(rng.standard_normal((b, n)), jnp.float32) if residual else None
  kw = dict(eps=1e-5, dtype=dtype, gate=gate, group_size=k // groups, residual=res)
  want = norm_matvec_numpy(x, nw, w, **kw)
  got = norm_matvec_gpu(x, nw, w, block_k=bk, block_n=bn, interpret=not ON_GPU, **kw)
  ref = norm_matvec_reference(x, nw, w, **kw)
  assert got.shape == (b, n) and got.dtype == (jnp.float32 if residual else dtype)
  assert ref.dtype == got.dtype
  assert _err(got, want) < TOL[dtype], "kernel"     # NaN (an unwritten block) fails too
  # On a GPU XLA's fp32 dot is TF32 by default, in the reference as in the model's layers.
  ref_tol = 2e-3 if ON_GPU and dtype == jnp.float32 else TOL[dtype]
  assert _err(ref, want) < ref_tol, "reference"


SHARED_ROW_CASES = [
    # b, k, widths, normed, gated, residual, dtype, block_k, block_n, k_splits
    (1, 64, (48, 17, 40), True, False, False, jnp.float32, 16, 16, 1),  # q, k, v-like
    (10, 40, (33, 8), True, False, False, jnp.bfloat16, 32, 16, 1),     # > MAX_ROWS rows
    (2, 48, (20,), False, False, False, jnp.float32, 16, 8, 1),         # a plain product
    (3, 72, (24,), False, True, True, jnp.float32, 32, 16, 1),          # SwiGLU's down-proj.
    (1, 2048, (40,), False, True, True, jnp.bfloat16, 256, None, None),  # ... 190M: split k
    (1, 768, (40, 24), True, False, False, jnp.bfloat16, 256, None, None),  # its up-proj.
    (3, 100, (17, 33), True, True, False, jnp.float32, 16, 16, 3),      # split, overhangs
    (9, 96, (20,), False, True, True, jnp.float32, 32, 8, 2),           # split + residual
]


@pytest.mark.parametrize("case", [
    # b, k, widths, product dtypes, block_n
    (1, 768, (96, 96, 96, 2), ("bf16",) * 3 + ("f32",), None),   # a SAL's q, k, v and gate
    (3, 40, (2, 17), ("f32", "bf16"), 16),                        # overhangs, > 1 row
])
def test_norm_matvec_products_in_their_own_dtypes(rng, case):
  """product_dtypes: the SAL's gate (fp32, 2 columns) in the launch of its bf16 q, k, v; the
  row is rounded to bf16 for all of them, each weight to its own dtype."""
  b, k, widths, names, bn = case
  pds = tuple({"bf16": jnp.bfloat16, "f32": jnp.float32}[n] for n in names)
  x = jnp.asarray(rng.standard_normal((b, k)) * 3, jnp.float32)
  nw = jnp.asarray(1 + 0.3 * rng.standard_normal(k), jnp.float32)
  ws = tuple(jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), pd)
             for n, pd in zip(widths, pds))
  kw = dict(eps=1e-5, dtype=jnp.bfloat16, product_dtypes=pds)
  want = norm_matvec_numpy(x, nw, ws, **kw)
  got = norm_matvec_gpu(x, nw, ws, block_n=bn, interpret=not ON_GPU, **kw)
  ref = norm_matvec_reference(x, nw, ws, **kw)
  for g, r, wt, n, pd in zip(got, ref, want, widths, pds):
    assert g.shape == r.shape == (b, n) and g.dtype == r.dtype == pd
    # fp32 products see only the fp32 accumulation (TF32 in XLA's reference on a GPU).
    tol = TOL[pd] if pd == jnp.bfloat16 else 2e-5
    assert _err(g, wt) < tol, ("kernel", pd)
    assert _err(r, wt) < (2e-3 if ON_GPU and pd == jnp.float32 else tol), ("reference", pd)


@pytest.mark.parametrize("case", [
    # b, k, n, dtype, k_splits
    (1, 768, 768, jnp.bfloat16, None),    # a SAL's o-projection
    (3, 40, 24, jnp.float32, 1),          # overhangs, > 1 row
    (2, 96, 20, jnp.float32, 3),          # k split: the blend after the partial sums
])
def test_norm_matvec_mixes_into_the_residual(rng, case):
  """mix: residual + mix * (product - residual) per row, as a SAL blends its attention
  output into the residual stream; mix 0 (an unselected token) leaves the residual exactly."""
  b, k, n, dtype, splits = case
  x = jnp.asarray(rng.standard_normal((b, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
  res = jnp.asarray(rng.standard_normal((b, n)), jnp.float32)
  mix = jnp.asarray(rng.uniform(0.2, 0.9, b), jnp.float32).at[0].set(0.0)
  kw = dict(eps=None, dtype=dtype, residual=res, mix=mix)
  want = norm_matvec_numpy(x, None, w, **kw)
  got = norm_matvec_gpu(x, None, w, k_splits=splits, interpret=not ON_GPU, **kw)
  ref = norm_matvec_reference(x, None, w, **kw)
  for name, out in (("kernel", got), ("reference", ref)):
    assert out.shape == (b, n) and out.dtype == jnp.float32, name
    assert _err(out, want) < (2e-3 if ON_GPU and dtype == jnp.float32 else TOL[dtype]), name
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(res[0]), err_msg=name)


@pytest.mark.parametrize("case", SHARED_ROW_CASES)
def test_norm_matvec_shared_row_and_plain_products(rng, case):
  """A tuple of weights (one launch for every product of the normalised row), no
  normalisation (norm_weight None) and k split among programs, against float64."""
  b, k, widths, normed, gated, residual, dtype, bk, bn, splits = case
  x = jnp.asarray(rng.standard_normal((b, k)) * 3, jnp.float32)
  gate = jnp.asarray(rng.standard_normal((b, k)), dtype) if gated else None
  nw = jnp.asarray(1 + 0.3 * rng.standard_normal(k), jnp.float32) if normed else None
  ws = tuple(jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype) for n in widths)
  w = ws if len(ws) > 1 else ws[0]
  res = jnp.asarray(rng.standard_normal((b, widths[0])), jnp.float32) if residual else None
  kw = dict(eps=1e-5, dtype=dtype, gate=gate, residual=res)
  want = norm_matvec_numpy(x, nw, w, **kw)
  got = norm_matvec_gpu(x, nw, w, block_k=bk, block_n=bn, k_splits=splits,
                        interpret=not ON_GPU, **kw)
  ref = norm_matvec_reference(x, nw, w, **kw)
  ref_tol = 2e-3 if ON_GPU and dtype == jnp.float32 else TOL[dtype]
  if len(ws) == 1:
    got, ref, want = (got,), (ref,), (want,)
  assert len(got) == len(ws) == len(ref)
  for g, r, wt, n in zip(got, ref, want, widths):
    assert g.shape == (b, n) and g.dtype == r.dtype == (jnp.float32 if residual else dtype)
    assert _err(g, wt) < TOL[dtype], "kernel"
    assert _err(r, wt) < ref_tol, "reference"


def mamba2_in_proj_numpy(x, nw, w, conv_state, cw, cb, *, eps, dtype, d_inner):
  f = lambda t: np.asarray(jnp.asarray(t, jnp.float32), np.float64)
  zx = _round(norm_matvec_numpy(x, nw, w, eps=eps, dtype=dtype), dtype)
  cd = cw.shape[1]
  window = np.concatenate([f(conv_state), _round(zx[:, None, d_inner:d_inner + cd],
                                                 conv_state.dtype)], axis=1)
  conv = (window * f(cw)[None]).sum(1) + f(cb)
  zx[:, d_inner:d_inner + cd] = _round(conv / (1 + np.exp(-conv)), dtype)
  return zx, window[:, 1:]


MAMBA2_IN_PROJ_CASES = [
    # b, d_model, d_inner, conv_dim, heads, d_conv, dtype, block_n
    (1, 48, 64, 96, 4, 4, jnp.float32, None),
    (3, 40, 32, 48, 2, 4, jnp.float32, 16),        # 3 rows; 2 heads: dt overhangs its block
    (11, 24, 16, 48, 3, 3, jnp.bfloat16, 8),       # > MAX_ROWS rows, d_conv 3
    (1, 300, 32, 64, 5, 4, jnp.float32, 32),       # d_model overhangs a 256-channel chunk
    (2, 768, 1536, 1792, 24, 4, jnp.bfloat16, None),  # the 190M model's mixer
]


@pytest.mark.parametrize("case", MAMBA2_IN_PROJ_CASES)
def test_mamba2_in_proj_matches_float64(rng, case):
  b, d, di, cd, heads, kc, dtype, bn = case
  x = jnp.asarray(rng.standard_normal((b, d)) * 3, jnp.float32)
  nw = jnp.asarray(1 + 0.3 * rng.standard_normal(d), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, di + cd + heads)) / np.sqrt(d), dtype)
  conv = jnp.asarray(rng.standard_normal((b, kc - 1, cd)), dtype)
  cw = jnp.asarray(rng.standard_normal((kc, cd)) * 0.5, jnp.float32)
  cb = jnp.asarray(rng.standard_normal(cd) * 0.5, jnp.float32)
  args = (x, nw, w.T, conv, cw, cb)              # the ops take in_proj transposed
  kw = dict(eps=1e-5, dtype=dtype, d_inner=di)
  want = mamba2_in_proj_numpy(x, nw, w, conv, cw, cb, **kw)
  kernel = mamba2_in_proj_gpu(*args, block_n=bn, interpret=not ON_GPU, **kw)
  ref_tol = 2e-3 if ON_GPU and dtype == jnp.float32 else TOL[dtype]
  for name, got, tol in (("kernel", kernel, TOL[dtype]),
                         ("reference", mamba2_in_proj_reference(*args, **kw), ref_tol)):
    assert [t.dtype for t in got] == [dtype, dtype], name
    for part, a, wt in zip(("zxbcdt", "conv"), got, want):
      # NaN (an unwritten block) fails too.
      assert a.shape == wt.shape and _err(a, wt) < tol, (name, part)


def mamba2_ssm_out_numpy(zx, ssm, dtb, alog, D, nw, w, residual, *, eps, group_size, heads,
                         head_dim, n_groups, d_state, dtype):
  f = lambda t: np.asarray(jnp.asarray(t, jnp.float32), np.float64)
  zx, ssm = f(zx), f(ssm)
  di, gn = heads * head_dim, n_groups * d_state
  b = zx.shape[0]
  x = zx[:, di:2 * di].reshape(b, heads, head_dim)
  rep = heads // n_groups
  B = np.repeat(zx[:, 2 * di:2 * di + gn].reshape(b, n_groups, d_state), rep, 1)
  C = np.repeat(zx[:, 2 * di + gn:2 * di + 2 * gn].reshape(b, n_groups, d_state), rep, 1)
  dt = np.logaddexp(zx[:, 2 * di + 2 * gn:] + f(dtb), 0.0)
  decay = np.exp(dt * -np.exp(f(alog)))
  state = decay[..., None, None] * ssm + (x * dt[..., None])[..., None] * B[:, :, None, :]
  y = _round(np.einsum("bhpn,bhn->bhp", state, C), dtype) + x * f(D)[:, None]
  out = norm_matvec_numpy(y.reshape(b, di), nw, w, eps=eps, dtype=dtype, gate=zx,
                          group_size=group_size, residual=residual)
  return out, state


MAMBA2_SSM_OUT_CASES = [
    # b, heads, head_dim, n_groups, norm groups, d_state, d_model, dtype, block_p, block_n
    (1, 4, 16, 1, 1, 32, 48, jnp.float32, 8, 32),     # d_model overhangs its last block
    (3, 6, 8, 2, 2, 16, 40, jnp.float32, None, 16),   # 2 groups: B, C shared by 3 heads each
    (2, 4, 16, 2, 4, 16, 24, jnp.bfloat16, 8, 16),    # norm groups finer than B/C groups
    # The 190M model's mixer (interpret mode runs its grid for seconds: XLA's optimizations
    # on, conftest)
    pytest.param((2, 24, 64, 1, 1, 128, 768, jnp.bfloat16, None, 256), marks=OPTIMIZED),
]


@pytest.mark.parametrize("case", MAMBA2_SSM_OUT_CASES)
def test_mamba2_ssm_out_matches_float64(rng, case):
  b, h, p, g, norm_groups, n, d, dtype, bp, bn = case
  di, cd = h * p, h * p + 2 * g * n
  zx = jnp.asarray(rng.standard_normal((b, di + cd + h)), dtype)
  ssm = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
  dtb, alog, D = (jnp.asarray(rng.standard_normal(h) * 0.5, jnp.float32) for _ in range(3))
  nw = jnp.asarray(1 + 0.3 * rng.standard_normal(di), jnp.float32)
  w = jnp.asarray(rng.standard_normal((di, d)) / np.sqrt(di), dtype)
  res = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
  args = (zx, ssm, dtb, alog, D, nw, w, res)
  kw = dict(eps=1e-5, group_size=di // norm_groups, heads=h, head_dim=p, n_groups=g, d_state=n)
  want = mamba2_ssm_out_numpy(*args, dtype=dtype, **kw)
  kernel = mamba2_ssm_out_gpu(*args, dtype=dtype, block_p=bp, block_n=bn,
                              interpret=not ON_GPU, **kw)
  ref_tol = 2e-3 if ON_GPU and dtype == jnp.float32 else TOL[dtype]
  for name, got, tol in (("kernel", kernel, TOL[dtype]),
                         ("reference", mamba2_ssm_out_reference(*args, dtype=dtype, **kw),
                          ref_tol)):
    assert [t.dtype for t in got] == [jnp.float32, jnp.float32], name
    # The output adds a product in dtype to the residual: its tolerance is relative to the
    # product, not to the sum. The state is fp32 throughout.
    product = want[0] - np.asarray(res, np.float64)
    assert got[0].shape == (b, d) and _err(got[0] - res, product) < tol, (name, "out")
    assert got[1].shape == want[1].shape and _err(got[1], want[1]) < 1e-5, (name, "ssm")


def window_attention_numpy(q, k, v, valid, active):
  q, k, v = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (q, k, v))
  s = np.einsum("bhd,bshd->bhs", q, k) / np.sqrt(q.shape[-1])
  s = np.where(valid[:, None, :], s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.where(valid[:, None, :], np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  total = p.sum(-1, keepdims=True)
  out = np.einsum("bhs,bshd->bhd", p / np.where(total > 0, total, 1.0), v)
  return out * np.asarray(active, np.float64)[:, None, None]


WINDOW_ATTENTION_CASES = [
    # b, slots, heads, head_dim, block_s, max_splits, dtype
    (1, 50, 2, 16, 16, 16, jnp.float32),        # 4 chunks of a block, the last overhangs
    (4, 64, 3, 32, 32, 16, jnp.float32),        # a row with no valid slot, an inactive row
    (4, 200, 2, 16, 16, 4, jnp.bfloat16),       # 13 blocks in 4 chunks of 4: loops, and a
                                                # chunk past the end
    pytest.param((2, 2048, 12, 64, 128, 16, jnp.bfloat16),   # a 190M SAL's ring buffer
                 marks=OPTIMIZED),
    (1, 9000, 1, 16, 64, None, jnp.bfloat16),   # the default split count: 32 chunks of 5
                                                # blocks, one cut short, three past the end
]


@pytest.mark.parametrize("case", WINDOW_ATTENTION_CASES)
def test_window_attention_matches_float64(rng, case):
  """The decode attention kernel and its reference against float64: valid slots scattered
  (a ring buffer part filled, or only the selected tokens for kv_select), a row that may
  read nothing, and inactive rows, which must come back as exact zeros."""
  b, slots, h, d, block_s, max_splits, dtype = case
  q = jnp.asarray(rng.standard_normal((b, h, d)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((b, slots, h, d)), dtype) for _ in range(2))
  valid = rng.random((b, slots)) < 0.6
  active = np.ones(b, bool)
  if b > 1:
    valid[1] = False          # a row with no valid slot reads zeros
  if b > 2:
    active[2] = False         # an unselected token
  want = window_attention_numpy(q, k, v, valid, active)
  for name, got in (
      ("kernel", window_attention_gpu(q, k, v, jnp.asarray(valid), jnp.asarray(active),
                                      block_s=block_s, max_splits=max_splits,
                                      interpret=not ON_GPU)),
      ("reference", window_attention_reference(q, k, v, jnp.asarray(valid),
                                               jnp.asarray(active)))):
    assert got.dtype == dtype, name
    assert _err(got, want) < TOL[dtype], name
    got = np.asarray(jnp.asarray(got, jnp.float32))
    assert not got[~active].any() and not (b > 1 and got[1].any()), name


RING_CASES = [
    # b, slots, heads, head_dim, block_s, max_splits, dtype, kv_selected_only
    (3, 50, 2, 16, 16, 16, jnp.float32, False),    # chunks of a block, the last overhangs
    (4, 64, 3, 32, 16, 2, jnp.float32, True),      # 2 chunks of 2 blocks: loops; kept only
    pytest.param((2, 2048, 12, 64, 128, 16, jnp.bfloat16, False),   # a 190M SAL's ring buffer
                 marks=OPTIMIZED),
]


@pytest.mark.parametrize("case", RING_CASES)
def test_ring_attention_appends_and_attends(rng, case):
  """ring_attention_gpu against float64 and its reference: the token's key and value land in
  slot pos % slots (rows part filled, wrapped around, at a chunk's first and last slot),
  flags and pos advance, the query reads the new entry; unselected rows are appended but
  return exact zeros; a kv_select row whose window keeps nothing reads zeros."""
  b, slots, h, d, block_s, max_splits, dtype, kv_only = case
  q, k_new, v_new = (jnp.asarray(rng.standard_normal((b, h, d)), dtype) for _ in range(3))
  k, v = (jnp.asarray(rng.standard_normal((b, slots, h, d)), dtype) for _ in range(2))
  pos = np.array([7, slots + 15, 3 * slots - 1, 16][:b], np.int32)   # < slots: part filled
  filled = np.arange(slots)[None, :] < np.minimum(pos, slots)[:, None]
  kept = filled & (rng.random((b, slots)) < 0.5)
  select = np.ones(b, np.float32)
  select[1] = 0.0                           # an unselected token: appended, output zero
  if kv_only and b > 3:
    kept[3] = False                          # nothing kept yet: only its own key, if selected
  args = (q, k_new, v_new, k, v, jnp.asarray(filled), jnp.asarray(kept), jnp.asarray(pos),
          jnp.asarray(select))
  rows, slot = np.arange(b), pos % slots
  k64, v64 = (np.asarray(jnp.asarray(t, jnp.float32), np.float64).copy() for t in (k, v))
  k64[rows, slot] = np.asarray(jnp.asarray(k_new, jnp.float32), np.float64)
  v64[rows, slot] = np.asarray(jnp.asarray(v_new, jnp.float32), np.float64)
  want_filled, want_kept = filled.copy(), kept.copy()
  want_filled[rows, slot] = True
  want_kept[rows, slot] = select > 0.5
  want = window_attention_numpy(q, k64, v64, want_kept if kv_only else want_filled, select > 0.5)
  ref_out, ref_cache = ring_attention_reference(*args, kv_selected_only=kv_only)
  got_out, got_cache = ring_attention_gpu(*args, kv_selected_only=kv_only, block_s=block_s,
                                          max_splits=max_splits, interpret=not ON_GPU)
  for name, out in (("kernel", got_out), ("reference", ref_out)):
    assert out.shape == (b, h, d) and out.dtype == dtype, name
    assert _err(out, want) < TOL[dtype], name
    assert not np.asarray(jnp.asarray(out[1], jnp.float32)).any(), name
  for g, r, name in zip(got_cache, ref_cache, ("k", "v", "filled", "kept", "pos")):
    assert g.dtype == r.dtype, name
    np.testing.assert_array_equal(np.asarray(g), np.asarray(r), err_msg=name)
  np.testing.assert_array_equal(np.asarray(got_cache[2]), want_filled)
  np.testing.assert_array_equal(np.asarray(got_cache[3]), want_kept)
  np.testing.assert_array_equal(np.asarray(got_cache[4]), pos + 1)


def test_bad_shapes_are_refused(rng):
  x = jnp.ones((1, 12), jnp.float32)
  with pytest.raises(ValueError, match="group_size=5 does not divide the 12 channels"):
    norm_matvec_gpu(x, jnp.ones(12), jnp.ones((12, 4)), eps=1e-5, dtype=jnp.float32,
                    group_size=5, interpret=True)
  with pytest.raises(ValueError, match="disagree on the channel count"):
    norm_matvec_gpu(x, jnp.ones(12), jnp.ones((10, 4)), eps=1e-5, dtype=jnp.float32,
                    interpret=True)
  with pytest.raises(ValueError, match="a residual is added to a single product"):
    norm_matvec_reference(x, jnp.ones(12), (jnp.ones((12, 4)), jnp.ones((12, 4))), eps=1e-5,
                          dtype=jnp.float32, residual=jnp.ones((1, 4)))
  with pytest.raises(ValueError, match="group_size=6 needs a norm_weight"):
    norm_matvec_gpu(x, None, jnp.ones((12, 4)), eps=1e-5, dtype=jnp.float32, group_size=6,
                    interpret=True)
  with pytest.raises(ValueError, match=r"residual \(1, 5\) must be \[1, 4\]"):
    norm_matvec_gpu(x, None, jnp.ones((12, 4)), eps=1e-5, dtype=jnp.float32,
                    residual=jnp.ones((1, 5)), interpret=True)
  z = jnp.ones((1, 2 * 36 + 2 * 8 + 3), jnp.float32)
  h3 = jnp.ones(3)
  with pytest.raises(ValueError, match="head_dim a power of two, got 12"):
    mamba2_ssm_out_gpu(z, jnp.ones((1, 3, 12, 8)), h3, h3, h3, jnp.ones(36), jnp.ones((36, 4)),
                       jnp.ones((1, 4)), eps=1e-5, dtype=jnp.float32, group_size=36, heads=3,
                       head_dim=12, n_groups=1, d_state=8, interpret=True)
  with pytest.raises(ValueError, match=r"ssm_state \(1, 3, 12\) is not \[1, 3, 12, 8\]"):
    mamba2_ssm_out_reference(z, jnp.ones((1, 3, 12)), h3, h3, h3, jnp.ones(36),
                             jnp.ones((36, 4)), jnp.ones((1, 4)), eps=1e-5, dtype=jnp.float32,
                             group_size=36, heads=3, head_dim=12, n_groups=1, d_state=8)
  with pytest.raises(ValueError, match=r"conv_state \(1, 2, 52\) is not \[1, 3, 52\]"):
    mamba2_in_proj_gpu(x, jnp.ones(12), jnp.ones((91, 12)), jnp.ones((1, 2, 52)),
                       jnp.ones((4, 52)), jnp.ones(52), eps=1e-5, dtype=jnp.float32,
                       d_inner=36, interpret=True)
  with pytest.raises(ValueError, match=r"in_proj transposed \(12, 91\) must be \[outputs, "
                                       r"d_model=12\] \(pass in_proj.kernel.T\)"):
    mamba2_in_proj_reference(x, jnp.ones(12), jnp.ones((12, 91)), jnp.ones((1, 3, 52)),
                             jnp.ones((4, 52)), jnp.ones(52), eps=1e-5, dtype=jnp.float32,
                             d_inner=36)
  with pytest.raises(ValueError, match="block_n=16 must be a power of two dividing d_inner=36"):
    mamba2_in_proj_gpu(x, jnp.ones(12), jnp.ones((91, 12)), jnp.ones((1, 3, 52)),
                       jnp.ones((4, 52)), jnp.ones(52), eps=1e-5, dtype=jnp.float32,
                       d_inner=36, block_n=16, interpret=True)
  q, kv = jnp.ones((1, 2, 12)), jnp.ones((1, 8, 2, 12))
  with pytest.raises(ValueError, match="head_dim a power of two, got 12"):
    window_attention_gpu(q, kv, kv, jnp.ones((1, 8), bool), interpret=True)
  q, kv = jnp.ones((1, 2, 16)), jnp.ones((1, 8, 2, 16))
  with pytest.raises(ValueError, match=r"valid \(1, 7\) must be \[batch, slots\]"):
    window_attention_gpu(q, kv, kv, jnp.ones((1, 7), bool), interpret=True)
  with pytest.raises(ValueError, match="must be \\[batch, heads, head_dim\\]"):
    window_attention_gpu(q, kv, kv[:, :, :1], jnp.ones((1, 8), bool), interpret=True)


def test_default_split_count():
  """About 512 slots a chunk, 16 to 128 chunks, a power of two."""
  from pallas_kernels.decode.window_attention import default_max_splits
  assert [default_max_splits(s) for s in (1, 2048, 8192, 8193, 16384, 65536, 1 << 20)] == [
      16, 16, 16, 32, 32, 128, 128]


