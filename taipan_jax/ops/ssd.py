"""Mamba-2's structured state-space duality (SSD) scan in its chunked parallel form (the decode
step is ops.decode.mamba2_in_proj and mamba2_ssm_out).

Per head h the recurrence (docs/spec.md section 2) is
    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t        S: [head_dim, d_state]
    y_t = S_t C_t
The chunked form (Mamba-2 paper, Listing 1) computes it in four steps: a quadratic
attention-like form inside each chunk, each chunk's own final state, the state passing
between chunks, and the contribution of the incoming state to every position of a chunk.
The state passing is a linear recurrence over chunks, written as `jax.lax.associative_scan`
so it runs in log depth over the chunk axis.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from taipan_jax.ops.context_parallel import (first_in_sequence, left_halo, sequence_axis,
                                             sequence_parallel, ssd_incoming_state)
from taipan_jax.ops.dispatch import Kernels, Route, choose, multiple_of, power_of_two
from taipan_jax.ops.kernel_sharding import per_shard


def _matmul_precision(dtype):
  # fp32 inputs get true fp32 matmuls (TPU and GPU default to bf16 passes otherwise);
  # bf16 inputs multiply in bf16 and accumulate in fp32 through preferred_element_type.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _segsum_exp(a):
  """exp(segsum(a)): L[..., i, j] = exp(a_{j+1} + ... + a_i) for i >= j, else 0.

  a: [..., Q] (fp32, <= 0). A masked cumulative sum instead of cumsum differences, so that
  entries stay exact when the running sum is large (the stable form of ssd_minimal.py).
  """
  q = a.shape[-1]
  rows = jnp.arange(q)[:, None]
  cols = jnp.arange(q)[None, :]
  # terms[..., k, j] = a_k for k > j: summing rows k <= i gives a_{j+1} + ... + a_i.
  terms = jnp.where(rows > cols, a[..., :, None], 0.0)
  seg = jnp.cumsum(terms, axis=-2)
  return jnp.where(rows >= cols, jnp.exp(jnp.where(rows >= cols, seg, 0.0)), 0.0)


def _combine_chunks(left, right):
  """Associative operator of the chunk recurrence S_c = g_c * S_{c-1} + s_c."""
  g1, s1 = left
  g2, s2 = right
  return g1 * g2, g2 * s1 + s2


# GPU: the Triton kernels where they tile the shape, measured faster than XLA on an H100
# (benchmarks/ssd.py). TPU: the Mosaic kernels where the chunk is a multiple of 128, chosen on
# compiled cost, not on a timing (no TPU has run them): they compile for v5e, v5p and v6e, and
# the train step with them needs less memory and moves fewer bytes than with XLA
# (docs/tpu_pod.md). Interpret mode off a TPU or GPU runs the TPU kernels.
KERNELS = Kernels("SSD", {"tpu": {"chunk_size": multiple_of(128, interpreted=False)},
                          "gpu": {"head_dim": power_of_two(16), "d_state": power_of_two(16)}})


def ssd_route(implementation: str = "auto", interpret: bool = False, *, head_dim=None,
              d_state=None, chunk_size=None) -> Route:
  """What `ssd` runs for these dimensions on the target platform (ops.dispatch.choose)."""
  return choose(KERNELS, implementation, interpret, head_dim=head_dim, d_state=d_state,
                chunk_size=chunk_size)


def ssd(x, dt, A, B, C, *, chunk_size: int = 256, initial_state=None,
        return_final_state: bool = False, segment_ids=None, implementation: str = "auto",
        interpret: bool = False):
  """Chunked SSD scan, without the D skip connection.

  `implementation` ('auto', 'xla', 'pallas') and `interpret` (ops/dispatch.py) pick the XLA
  path below, the Pallas GPU (Triton) kernels or the Pallas TPU (Mosaic) kernels, each with
  its own backward kernels.

  Args:
    x: [batch, seq, heads, head_dim] inputs (fp32 or bf16).
    dt: [batch, seq, heads] step sizes, already softplus'd (>= 0).
    A: [heads] negative decay rates.
    B, C: [batch, seq, groups, d_state]; head h reads group h // (heads // groups).
    chunk_size: Q; any seq works (the tail is padded with dt = 0, which changes nothing).
    initial_state: optional [batch, heads, head_dim, d_state] state before position 0.
    return_final_state: also return the state after the last position.
    segment_ids: optional [batch, seq] int, each id one contiguous run (packed documents):
      the state resets where the id changes, so no token sees another document. The
      initial state belongs to the first position's segment.

  Returns:
    y: [batch, seq, heads, head_dim] in x.dtype; with return_final_state also the final
    state [batch, heads, head_dim, d_state] in fp32.
  """
  if sequence_axis() is not None:
    return _ssd_context_parallel(x, dt, A, B, C, chunk_size=chunk_size,
                                 initial_state=initial_state,
                                 return_final_state=return_final_state,
                                 segment_ids=segment_ids, implementation=implementation,
                                 interpret=interpret)
  b, l, h, p = x.shape
  g, n = B.shape[-2:]
  if h % g:
    raise ValueError(f"heads={h} must be divisible by groups={g}")
  if dt.shape != (b, l, h) or A.shape != (h,) or B.shape != C.shape or B.shape[:2] != (b, l):
    raise ValueError(f"ssd shapes disagree: x {x.shape}, dt {dt.shape}, A {A.shape}, "
                     f"B {B.shape}, C {C.shape}")
  route = ssd_route(implementation, interpret, head_dim=p, d_state=n, chunk_size=chunk_size)
  if route.implementation == "xla":
    return _ssd_xla(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state,
                    return_final_state=return_final_state, segment_ids=segment_ids)
  from pallas_kernels.ssd import BlockSizes, ssd_gpu, ssd_tpu
  if route.platform == "gpu":
    # The kernels tile by their own tuned chunk; the result does not depend on chunk_size.
    kernel = functools.partial(ssd_gpu, block_sizes=BlockSizes.for_backend("gpu"),
                               interpret=route.interpret)
  else:
    kernel = functools.partial(ssd_tpu, block_sizes=BlockSizes(chunk=chunk_size),
                               interpret=route.interpret)
  init = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else segment_ids
  call = lambda A, x, dt, B, C, init, seg: kernel(x, dt, A, B, C, init, seg)
  y, final = per_shard(call, (A,), (x, dt, B, C, init, seg), num_outputs=2)
  return (y, final) if return_final_state else y


def _ssd_context_parallel(x, dt, A, B, C, *, chunk_size, initial_state, return_final_state,
                          segment_ids, implementation, interpret):
  """This device's shard of a sequence split over the sequence axis: the local SSD from a
  zero state, then the state that enters the shard (ops.context_parallel) carried through it:
  y_t += exp(sum_{r<=t} dt_r A) C_t . S_in, for the positions of the shard's first document.

  With segment_ids (packed documents), the entering state reaches only the shard's first run
  of one id, and only if that run continues the previous shard's last document; a shard with
  a document start inside passes on its own final state alone."""
  with sequence_parallel(None):
    y, local_final = ssd(x, dt, A, B, C, chunk_size=chunk_size, return_final_state=True,
                         segment_ids=segment_ids, implementation=implementation,
                         interpret=interpret)
  b, l, h = dt.shape
  g = B.shape[2]
  log_decay = jnp.cumsum(dt.astype(jnp.float32) * A.astype(jnp.float32), axis=1)  # [b, l, h]
  reach = jnp.ones((b, l), bool)
  continues = None
  if segment_ids is not None:
    reach = jnp.cumprod(segment_ids == segment_ids[:, :1], axis=1).astype(bool)
    continues = first_in_sequence() | (left_halo(segment_ids, 1)[:, 0] == segment_ids[:, 0])
  decay = jnp.where(reach[:, -1:], jnp.exp(log_decay[:, -1]), 0.0)               # [b, h]
  incoming = ssd_incoming_state(local_final, decay, initial_state, continues)
  C_heads = jnp.repeat(C.astype(jnp.float32), h // g, axis=2)                    # [b, l, h, n]
  carried = jnp.einsum("blhn,bhpn->blhp", C_heads, incoming,
                       precision=jax.lax.Precision.HIGHEST)
  gain = jnp.where(reach[..., None], jnp.exp(log_decay), 0.0)                     # [b, l, h]
  y = (y.astype(jnp.float32) + gain[..., None] * carried).astype(y.dtype)
  if not return_final_state:
    return y
  return y, local_final + decay[..., None, None] * incoming


def _ssd_xla(x, dt, A, B, C, *, chunk_size: int = 256, initial_state=None,
             return_final_state: bool = False, segment_ids=None):
  """The XLA chunked SSD (the 'xla' implementation of `ssd`)."""
  b, l, h, p = x.shape
  g, n = B.shape[-2:]
  cdt = x.dtype
  prec = _matmul_precision(cdt)
  q = chunk_size
  pad = (-l) % q
  if pad:
    widths = lambda t: [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)
    x, dt, B, C = (jnp.pad(t, widths(t)) for t in (x, dt, B, C))
    if segment_ids is not None:
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), mode="edge")
  nc = (l + pad) // q
  hg = h // g
  if segment_ids is not None:
    seg = segment_ids.reshape(b, nc, q)
    seg_last = seg[:, :, -1]                                  # the segment chunk c ends in
    seg_prev = jnp.concatenate([seg[:, :1, 0], seg_last[:, :-1]], axis=1)  # S_{c-1}'s segment

  dt = dt.astype(jnp.float32)
  # Chunked views; heads are split into (groups, heads per group) so B and C are never
  # repeated across the heads of a group.
  xc = x.reshape(b, nc, q, g, hg, p)
  Bc = B.reshape(b, nc, q, g, n).astype(cdt)
  Cc = C.reshape(b, nc, q, g, n).astype(cdt)
  a = (dt * A.astype(jnp.float32)).reshape(b, nc, q, g, hg)
  a = jnp.moveaxis(a, 2, -1)                                  # [b, c, g, hg, q]
  a_cs = jnp.cumsum(a, axis=-1)
  xdt = (xc.astype(jnp.float32) * dt.reshape(b, nc, q, g, hg, 1)).astype(cdt)

  # 1. intra-chunk (diagonal blocks): Y_diag[i] = sum_{j<=i} (C_i.B_j) L[i,j] xdt_j
  cb = jnp.einsum("bcign,bcjgn->bcgij", Cc, Bc, precision=prec,
                  preferred_element_type=jnp.float32)
  L = _segsum_exp(a)                                          # [b, c, g, hg, q, q]
  if segment_ids is not None:
    # Segments are contiguous: equal ids at i and j mean no boundary between them.
    L = jnp.where((seg[:, :, :, None] == seg[:, :, None, :])[:, :, None, None], L, 0.0)
  scores = (cb[:, :, :, None] * L).astype(cdt)
  y_diag = jnp.einsum("bcghij,bcjghp->bcighp", scores, xdt, precision=prec,
                      preferred_element_type=jnp.float32)

  # 2. each chunk's final state from its own inputs: s_c = sum_j exp(a_cs[-1]-a_cs[j]) xdt_j B_j
  decay_to_end = jnp.exp(a_cs[..., -1:] - a_cs)               # [b, c, g, hg, q]
  if segment_ids is not None:      # only the chunk's last segment reaches its final state
    decay_to_end = jnp.where((seg == seg_last[..., None])[:, :, None, None], decay_to_end, 0.0)
  weighted_x = (xdt.astype(jnp.float32)
                * jnp.moveaxis(decay_to_end, -1, 2)[..., None]).astype(cdt)
  chunk_states = jnp.einsum("bcjgn,bcjghp->bcghpn", Bc, weighted_x, precision=prec,
                            preferred_element_type=jnp.float32)

  # 3. state passing between chunks: S_c = exp(sum_c a) S_{c-1} + s_c, as an associative scan.
  chunk_decay = jnp.exp(a_cs[..., -1])[..., None, None]       # [b, c, g, hg, 1, 1]
  if segment_ids is not None:      # a boundary inside chunk c cuts S_{c-1} off
    chunk_decay = jnp.where((seg_last == seg_prev)[:, :, None, None, None, None],
                            chunk_decay, 0.0)
  if initial_state is not None:
    s0 = initial_state.astype(jnp.float32).reshape(b, g, hg, p, n)
    chunk_states = chunk_states.at[:, 0].add(chunk_decay[:, 0] * s0)
  _, states = jax.lax.associative_scan(_combine_chunks, (chunk_decay, chunk_states), axis=1)
  if initial_state is None:
    s0 = jnp.zeros_like(states[:, 0])
  incoming = jnp.concatenate([s0[:, None], states[:, :-1]], axis=1)  # state before chunk c

  # 4. inter-chunk (off-diagonal blocks): Y_off[i] = exp(a_cs[i]) C_i . S_{c-1}
  y_off = jnp.einsum("bcign,bcghpn->bcighp", Cc, incoming.astype(cdt), precision=prec,
                     preferred_element_type=jnp.float32)
  decay_in = jnp.moveaxis(jnp.exp(a_cs), -1, 2)               # [b, c, q, g, hg]
  if segment_ids is not None:      # the incoming state reaches its own segment only
    decay_in = jnp.where((seg == seg_prev[..., None])[..., None, None], decay_in, 0.0)
  y_off = y_off * decay_in[..., None]

  y = (y_diag + y_off).reshape(b, nc * q, h, p)[:, :l].astype(cdt)
  if return_final_state:
    return y, states[:, -1].reshape(b, h, p, n)
  return y
