"""A run of consecutive Mamba-2 blocks' decode token in one Pallas Triton launch.

    for each block:  h <- h + GatedRMSNorm(SSD step(conv(RMSNorm(h) @ in_proj))) @ out_proj

A block is three phases, each of which needs all of the one before: the in-projection with
its convolution (mamba2_in_proj), the state update with the out-projection's partial products
(mamba2_ssm_out), and the finishing sum of those partials into the residual stream. As
separate launches each phase pays a launch and, since nothing can be loaded before a kernel
starts, the full memory latency of its weights; on an H200 the 190M block took 13.3 µs that
way, of which about 2.6 µs is the weights' bytes at full bandwidth (docs/kernels/decode.md).

Here one launch of G programs (at most one per multiprocessor, so that all of them are
resident at once) runs every phase of every block in the run, with a grid-wide barrier
between phases: each program adds one to a counter in global memory and waits until the
counter reaches G times the barrier's number. Before each barrier a program issues the loads
of its next phase that do not depend on the barrier: the out-projection rows and the old state
rows of its state-update program, the in-projection rows of the next block. Only the small
activations (h, zxbcdt, the partial products) are read after it, uncached, since other
programs of the same launch wrote them.

The phases' code is that of the per-block kernels (load_weights / compute_rows of
mamba2_in_proj, load_weights / compute_program / finish_columns of mamba2_ssm_out): the same
blocking, the same arithmetic, the same results bit for bit. `mode='phased'` runs each phase
of each block as a launch of its own over the same buffers. Pallas interpret mode runs the
programs of a launch one after another, where a barrier would wait forever, so interpret
mode always runs phased.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode import mamba2_in_proj as in_proj
from pallas_kernels.decode import mamba2_ssm_out as ssm_out
from pallas_kernels.decode.norm_matvec import MAX_ROWS
from pallas_kernels.decode.reference import check_mamba2_blocks_operands

_F32 = jnp.float32
WEIGHTS_PER_BLOCK = 9     # norm, in_proj^T, conv weight, conv bias, dt_bias, A_log, D,
                          # gated norm, out_proj
BARRIERS = ("volatile_acquire", "atomic")
# Columns a finishing program sums (48 programs for d_model 768: each reads 96 partials of 16).
FINISH_COLUMNS = 16
# The state-update phase's out_proj columns per load (mamba2_ssm_out's default).
SSM_BLOCK_N = 256


def _arrive(sync_ref):
  """This program's arrival at the next grid barrier: a thread barrier orders its threads'
  stores before an acquire-release atomic add (one thread of the program) at GPU scope."""
  plgpu.debug_barrier()
  plgpu.atomic_add(sync_ref, 0, jnp.int32(1))


def _wait(sync_ref, target, how):
  """Waits until the counter reaches target (every program's arrival at this barrier).

  'atomic' polls with acquire-release atomics; 'volatile_acquire' polls with uncached loads,
  which do not queue at the L2's atomic unit, and ends with one atomic read for the acquire.
  The thread barrier after it orders every thread's later loads after that acquire."""
  if how == "atomic":
    jax.lax.while_loop(lambda v: v < target,
                       lambda _: plgpu.atomic_add(sync_ref, 0, jnp.int32(0)), jnp.int32(0))
  else:
    jax.lax.while_loop(lambda v: v < target,
                       lambda _: plgpu.load(sync_ref.at[0], volatile=True), jnp.int32(0))
    plgpu.atomic_add(sync_ref, 0, jnp.int32(0))
  plgpu.debug_barrier()


class _Plan:
  """Static shapes and blocking of one call, and which item of each phase a program owns."""

  def __init__(self, *, b, d_model, n, d_inner, conv_dim, d_conv, heads, head_dim, n_groups,
               d_state, group_size, block_n, block_k, block_p, eps, gate_eps, dtype):
    self.b, self.d_model, self.n, self.d_inner, self.conv_dim = b, d_model, n, d_inner, conv_dim
    self.d_conv, self.heads, self.head_dim, self.n_groups = d_conv, heads, head_dim, n_groups
    self.d_state, self.group_size, self.eps, self.gate_eps = d_state, group_size, eps, gate_eps
    self.block_n, self.block_k, self.block_p, self.dtype = block_n, block_k, block_p, dtype
    self.rows = min(b, MAX_ROWS)
    self.out_blocks = pl.cdiv(n, block_n)
    self.n_in = pl.cdiv(b, self.rows) * self.out_blocks
    self.p_blocks = head_dim // block_p
    self.splits = heads * self.p_blocks
    self.n_ssm = b * self.splits
    self.col_blocks = pl.cdiv(d_model, FINISH_COLUMNS)
    self.n_finish = b * self.col_blocks
    self.programs = max(self.n_in, self.n_ssm, self.n_finish)

  def in_item(self, pid):
    a = jnp.minimum(pid, self.n_in - 1)     # idle programs load a real block, store nothing
    return (a // self.out_blocks) * self.rows, (a % self.out_blocks) * self.block_n

  def ssm_item(self, pid):
    s = jnp.minimum(pid, self.n_ssm - 1)
    bi, split = s // self.splits, s % self.splits
    return bi, split // self.p_blocks, split % self.p_blocks

  def finish_item(self, pid):
    f = jnp.minimum(pid, self.n_finish - 1)
    return f // self.col_blocks, f % self.col_blocks


def _phases(plan, refs, pid, *, barrier, thread_barrier, prefetch="early", volatile=True,
            only=None):
  """The program's work for every block, phase by phase. refs: a dict of refs and lists of
  refs. barrier: (arrive, wait), the two halves of the next grid barrier (None: phased,
  `only` = (phase, block) names the one phase this launch runs). prefetch: issue the next
  phase's loads before the phase that precedes the barrier ('early') or between arriving and
  waiting ('split'). thread_barrier: mamba2_in_proj's barrier before its in-place
  cache shift (off in interpret mode, which runs no threads)."""
  p = plan
  n_layers = len(refs["conv"])

  def in_weights(l):
    nw, wt, cw, cb = (refs["w"][l][i] for i in (0, 1, 2, 3))
    _, j0 = p.in_item(pid)
    return in_proj.load_weights(wt, nw, cw, cb, j0=j0, d_inner=p.d_inner, d_conv=p.d_conv,
                                block_n=p.block_n, block_k=p.block_k, dtype=p.dtype)

  def ssm_weights(l):
    _, _, _, _, dtb, alog, d, gnw, wout = refs["w"][l]
    bi, hi, pi = p.ssm_item(pid)
    return ssm_out.load_weights(refs["ssm"][l], dtb, alog, d, gnw, wout, bi=bi, hi=hi, pi=pi,
                                block_p=p.block_p, block_n=SSM_BLOCK_N, head_dim=p.head_dim)

  def run_in(l, weights):
    row0, j0 = p.in_item(pid)
    x_ref = refs["h"] if l == 0 else refs["h_out"]

    @pl.when(pid < p.n_in)
    def _():
      in_proj.compute_rows(x_ref, refs["conv"][l], refs["zx"], refs["conv_out"][l], weights,
                           row0=row0, j0=j0, rows=p.rows, block_n=p.block_n, d_conv=p.d_conv,
                           eps=p.eps, dtype=p.dtype, barrier=thread_barrier,
                           volatile=l > 0 and volatile)

  def run_ssm(l, weights):
    bi, hi, _ = p.ssm_item(pid)

    @pl.when(pid < p.n_ssm)
    def _():
      ssm_out.compute_program(refs["zx"], refs["ssm_out"][l], refs["part"], refs["ss"],
                              weights, bi=bi, hi=hi, heads=p.heads, head_dim=p.head_dim,
                              n_groups=p.n_groups, d_state=p.d_state, block_p=p.block_p,
                              dtype=p.dtype, volatile=volatile)

  def run_finish(l):
    bi, j = p.finish_item(pid)
    groups = p.d_inner // p.group_size

    @pl.when(pid < p.n_finish)
    def _():
      ssm_out.finish_columns(refs["part"], refs["ss"], refs["h"] if l == 0 else refs["h_out"],
                             refs["h_out"], bi=bi, j=j, splits=p.splits, groups=groups,
                             group_splits=p.splits // groups, eps=p.gate_eps,
                             group_size=p.group_size, block_n=FINISH_COLUMNS, dtype=p.dtype,
                             volatile=volatile)

  if barrier is None:                     # phased: one phase of one block
    phase, l = only
    if phase == 0:
      run_in(l, in_weights(l))
    elif phase == 1:
      run_ssm(l, ssm_weights(l))
    else:
      run_finish(l)
    return
  arrive, wait = barrier
  split = prefetch == "split"
  weights_in = in_weights(0)
  for l in range(n_layers):
    if not split:
      weights_ssm = ssm_weights(l)        # in flight during the in-projection and barrier
    run_in(l, weights_in)
    arrive()
    if split:
      weights_ssm = ssm_weights(l)        # in flight while the other programs arrive
    wait()
    run_ssm(l, weights_ssm)
    if l + 1 < n_layers and not split:
      weights_in = in_weights(l + 1)      # in flight during the finishing phase
    arrive()
    if l + 1 < n_layers and split:
      weights_in = in_weights(l + 1)
    wait()
    run_finish(l)
    if l + 1 < n_layers:
      arrive()
      wait()


def _kernel(*refs, plan, n_layers, fused, only, how, thread_barrier, prefetch, volatile):
  """refs: h, weights (WEIGHTS_PER_BLOCK a block), conv states, ssm states, sync, [phased:
  h_out, zx, part, ss as inputs too], then the outputs h_out, zx, part, ss, conv states,
  ssm states, sync."""
  it = iter(refs)
  take = lambda k: [next(it) for _ in range(k)]
  h = next(it)
  flat = take(WEIGHTS_PER_BLOCK * n_layers)
  w = [flat[i * WEIGHTS_PER_BLOCK:(i + 1) * WEIGHTS_PER_BLOCK] for i in range(n_layers)]
  conv, ssm = take(n_layers), take(n_layers)
  next(it)                                 # sync (input)
  if not fused:
    take(4)                                # h_out, zx, part, ss (inputs aliased to outputs)
  h_out, zx, part, ss = take(4)
  conv_out, ssm_out_refs = take(n_layers), take(n_layers)
  sync = next(it)
  named = dict(h=h, w=w, conv=conv, ssm=ssm, h_out=h_out, zx=zx, part=part, ss=ss,
               conv_out=conv_out, ssm_out=ssm_out_refs)
  pid = pl.program_id(0)
  barrier = None
  if fused:
    arrivals = iter(range(1, 3 * n_layers))
    barrier = (lambda: _arrive(sync),
               lambda: _wait(sync, next(arrivals) * plan.programs, how))
  _phases(plan, named, pid, barrier=barrier, thread_barrier=thread_barrier, prefetch=prefetch,
          volatile=volatile, only=only)


def default_block_n(d_inner: int, conv_dim: int, n: int, rows_blocks: int,
                    max_programs: int) -> int:
  """The in-projection's outputs per program: mamba2_in_proj's default, doubled until one
  launch of at most max_programs covers the projection (32 for the 190M block on an H200's
  132 multiprocessors: 105 programs)."""
  block_n = in_proj.default_block_n(d_inner, conv_dim)
  common = math.gcd(d_inner, conv_dim)
  while rows_blocks * pl.cdiv(n, block_n) > max_programs and common % (2 * block_n) == 0:
    block_n *= 2
  return block_n


def _plan(h, blocks, *, heads, head_dim, n_groups, d_state, group_size, max_programs, block_k,
          eps, gate_eps, dtype) -> _Plan:
  b, d_model = h.shape
  n = blocks[0][1].shape[0]
  d_conv, conv_dim = blocks[0][2].shape
  d_inner = heads * head_dim
  return _Plan(b=b, d_model=d_model, n=n, d_inner=d_inner, conv_dim=conv_dim, d_conv=d_conv,
               heads=heads, head_dim=head_dim, n_groups=n_groups, d_state=d_state,
               group_size=group_size,
               block_n=default_block_n(d_inner, conv_dim, n, pl.cdiv(b, min(b, MAX_ROWS)),
                                       max_programs),
               block_k=block_k, block_p=ssm_out.default_block_p(head_dim, group_size),
               eps=eps, gate_eps=gate_eps, dtype=jnp.dtype(dtype) if dtype else None)


def fits_one_launch(h, blocks, *, heads: int, head_dim: int, group_size: int,
                    max_programs: int) -> bool:
  """Whether one launch of at most max_programs programs covers every phase of these
  operands (the fused mode's condition; the in-projection's block is widened to fit)."""
  plan = _plan(h, blocks, heads=heads, head_dim=head_dim, n_groups=1, d_state=1,
               group_size=group_size, max_programs=max_programs, block_k=256, eps=None,
               gate_eps=None, dtype=None)
  return plan.programs <= max_programs


def multiprocessor_count() -> int:
  """The default device's multiprocessors (the most programs a fused launch may take)."""
  return int(getattr(jax.devices()[0], "core_count", 0) or 0)


@functools.partial(jax.jit, static_argnames=(
    "eps", "gate_eps", "dtype", "group_size", "heads", "head_dim", "n_groups", "d_state",
    "mode", "max_programs", "block_k", "num_warps", "barrier", "prefetch", "volatile",
    "interpret"))
def mamba2_blocks_gpu(h, blocks, conv_states, ssm_states, *, eps: float, gate_eps: float, dtype,
                      group_size: int, heads: int, head_dim: int, n_groups: int, d_state: int,
                      mode: str = "fused", max_programs: int | None = None, block_k: int = 256,
                      num_warps: int = 8, barrier: str = "volatile_acquire",
                      prefetch: str = "early", volatile: bool = True,
                      interpret: bool = False):
  """See reference.mamba2_blocks_reference (same arguments and results).

  h: [b, d_model] fp32; blocks: per block (norm_weight [d_model], in_proj^T [n, d_model],
  conv_weight [d_conv, conv_dim], conv_bias [conv_dim], dt_bias, A_log, D [heads], gated norm
  weight [d_inner], out_proj [d_inner, d_model]); conv_states: per block [b, d_conv - 1,
  conv_dim], ssm_states: per block [b, heads, head_dim, d_state] fp32, both updated in place.
  mode: 'fused' (one launch; needs the programs to fit in max_programs, default the device's
  multiprocessor count) or 'phased' (a launch per phase). Interpret mode runs phased.
  """
  check_mamba2_blocks_operands(h, blocks, conv_states, ssm_states, group_size=group_size,
                               heads=heads, head_dim=head_dim, n_groups=n_groups,
                               d_state=d_state)
  if mode not in ("fused", "phased"):
    raise ValueError(f"mode={mode!r}: use 'fused' (one launch) or 'phased'")
  if barrier not in BARRIERS:
    raise ValueError(f"barrier={barrier!r}: use one of {BARRIERS}")
  fused = mode == "fused" and not interpret
  b, d_model = h.shape
  n_layers = len(blocks)
  n = blocks[0][1].shape[0]
  if max_programs is None:
    max_programs = multiprocessor_count() if fused else 132
  plan = _plan(h, blocks, heads=heads, head_dim=head_dim, n_groups=n_groups, d_state=d_state,
               group_size=group_size, max_programs=max_programs, block_k=block_k, eps=eps,
               gate_eps=gate_eps, dtype=dtype)
  if fused and plan.programs > max_programs:
    raise ValueError(
        f"one launch needs {plan.programs} programs for batch {b} (in-projection "
        f"{plan.n_in}, state update {plan.n_ssm}), more than max_programs={max_programs} "
        "(the multiprocessors, all of which must be resident for the grid barrier); use "
        "mode='phased' or the per-block ops")
  flat_w = [w for blk in blocks for w in blk]
  ins = [h, *flat_w, *conv_states, *[s.astype(_F32) for s in ssm_states]]
  first_conv = 1 + len(flat_w)
  scratch = [jax.ShapeDtypeStruct((b, d_model), _F32), jax.ShapeDtypeStruct((b, n), dtype),
             jax.ShapeDtypeStruct((plan.splits, b, d_model), _F32),
             jax.ShapeDtypeStruct((plan.splits, b), _F32)]
  states = [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in conv_states] + \
      [jax.ShapeDtypeStruct(s.shape, _F32) for s in ssm_states]
  out_shape = scratch + states + [jax.ShapeDtypeStruct((1,), jnp.int32)]
  sync = jnp.zeros((1,), jnp.int32)
  # The states (and the counter) are updated in place: output 4 + i is input first_conv + i.
  aliases = {first_conv + i: 4 + i for i in range(2 * n_layers)}
  aliases[first_conv + 2 * n_layers] = 4 + 2 * n_layers
  params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
  kernel = functools.partial(_kernel, plan=plan, n_layers=n_layers, how=barrier,
                             thread_barrier=not interpret, prefetch=prefetch,
                             volatile=volatile)
  if fused:
    outs = pl.pallas_call(
        functools.partial(kernel, fused=True, only=None), out_shape=out_shape,
        grid=(plan.programs,), input_output_aliases=aliases, compiler_params=params,
        name="mamba2_blocks")(*ins, sync)
  else:
    # Each launch passes every buffer on; the scratch starts as NaN, so a read of anything no
    # phase wrote shows.
    outs = [jnp.full(s.shape, jnp.nan, s.dtype) for s in scratch] + ins[first_conv:] + [sync]
    phased_aliases = {first_conv + 2 * n_layers + 1 + i: i for i in range(4)} | aliases
    for l in range(n_layers):
      for phase, items in ((0, plan.n_in), (1, plan.n_ssm), (2, plan.n_finish)):
        outs = pl.pallas_call(
            functools.partial(kernel, fused=False, only=(phase, l)), out_shape=out_shape,
            grid=(items,), input_output_aliases=phased_aliases, compiler_params=params,
            interpret=interpret, name=f"mamba2_blocks_phase{phase}")(
                *ins[:first_conv], *outs[4:], *outs[:4])
  h_out = outs[0]
  conv_out = tuple(outs[4:4 + n_layers])
  ssm_new = tuple(outs[4 + n_layers:4 + 2 * n_layers])
  return h_out, conv_out, ssm_new
