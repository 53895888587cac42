"""The Selective Attention Layer (docs/spec.md section 3; paper eq. 1-6)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from taipan_jax import ops
from taipan_jax.config import mlp_hidden_size
from taipan_jax.models.attention import apply_rope
from taipan_jax.models.layer import LayerOutput
from taipan_jax.models.mlp import SwiGLU, dense
from taipan_jax.models.norms import RMSNorm
from taipan_jax.sharding import with_axes


def _take_rows(t, index):
  """t: [batch, n, ...], index: [batch, m] -> [batch, m, ...], t[b, index[b, i]]."""
  return jnp.take_along_axis(t, index.reshape(index.shape + (1,) * (t.ndim - 2)), axis=1)


@struct.dataclass
class SALCache:
  """Ring buffer of the last `window` keys and values; size independent of sequence length.

  k, v: [batch, window, heads, head_dim], slot = position % window.
  filled: [batch, window] bool, slot holds a token. kept: [batch, window] bool, that token
  was selected (keys of the kv_selected_only variant; the inference cap's count).
  margin: [batch, window] fp32, that token's gate margin s1 - s0 (the window_rank rule).
  pos: [batch] int32, tokens seen so far.
  """
  k: jax.Array
  v: jax.Array
  filled: jax.Array
  kept: jax.Array
  margin: jax.Array
  pos: jax.Array


# The eval-time Gumbel noise of SAL i is drawn from fold_in(key(_EVAL_NOISE_SEED), i): fixed,
# so that every evaluation of a model selects the same tokens.
_EVAL_NOISE_SEED = 0x7A1


class Gate(nnx.Module):
  """G(x): d_model -> 2 scores per token (decision b).  x: [..., d] -> [..., 2] fp32.

  The bias starts at [0, logit(C)]: with Gumbel-max sampling P(select) = sigmoid(s1 - s0),
  so the initial selected fraction is about the budget C.
  """

  def __init__(self, d: int, hidden: int, capacity: float, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    small = nnx.initializers.normal(0.02)
    axes = dict(kernel_metadata=with_axes("gate_in", "gate_out"),
                bias_metadata=with_axes("gate_out"))
    self.hidden = (nnx.Linear(d, hidden, kernel_init=small, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs, **axes) if hidden else None)
    bias = jnp.array([0.0, math.log(capacity / (1.0 - capacity)) if capacity < 1 else 10.0])
    self.out = nnx.Linear(hidden or d, 2, kernel_init=small,
                          bias_init=lambda *_: bias.astype(param_dtype), dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs, **axes)

  def __call__(self, x):
    if self.hidden is not None:
      x = jax.nn.silu(self.hidden(x))
    return self.out(x).astype(jnp.float32)


class SelectiveAttentionLayer(nnx.Module):
  """Gate -> select -> sliding-window attention for the selected tokens -> mix -> SwiGLU.

  h: [batch, seq, d_model] fp32 residual stream -> same shape, plus aux:
    mask [batch, seq] (straight-through during training, exact 0/1 forward),
    mix [batch, seq] eq. 5's weight of the attention output (mask * alpha),
    fraction [batch] selected fraction over real tokens.

  Training (`deterministic=False`): straight-through Gumbel-softmax selection.
  Evaluation and decoding (`model.eval()`): sal.inference_selection (decision e; by default the
  training draw with its noise fixed by position and token), optionally capped at
  `sal.inference_capacity` selected tokens per window.
  """

  def __init__(self, cfg, *, residual_scale: float, rngs: nnx.Rngs):
    m, sal = cfg.model, cfg.sal
    d = m.d_model
    self.heads = d // sal.head_dim
    self.head_dim = sal.head_dim
    self.window = sal.window
    self.capacity = sal.capacity
    self.tau = sal.tau
    self.select_all = sal.selection == "all"
    self.straight_through = sal.straight_through
    self.kv_selected_only = sal.kv_selected_only
    self.rope = sal.rope
    self.rope_theta = cfg.attention.rope_theta
    self.inference_capacity = sal.inference_capacity
    self.inference_selection = sal.inference_selection
    self.select_seed = 0          # the SAL's ordinal in the model (LanguageModel sets it)
    self.kernel = sal.kernel                 # how the ops run: ops/dispatch.py
    self.interpret = sal.interpret
    self.dtype = jnp.dtype(m.dtype)
    self.deterministic = False
    pdt = jnp.dtype(m.param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=pdt, rngs=rngs)
    self.norm_a = RMSNorm(d, eps=m.norm_eps, dtype=self.dtype, param_dtype=pdt)
    # The gate's decisions are discrete: computed in fp32 so that bf16 rounding flips as few
    # selections as possible (its cost is a d_model x 2 matmul).
    self.gate = Gate(d, sal.gate_hidden, sal.capacity, dtype=jnp.float32, param_dtype=pdt,
                     rngs=rngs)
    self.q_proj = dense(d, d, axes=("embed", "heads"), **kw)
    self.k_proj = dense(d, d, axes=("embed", "heads"), **kw)
    self.v_proj = dense(d, d, axes=("embed", "heads"), **kw)
    self.o_proj = dense(d, d, axes=("heads", "embed"), scale=residual_scale, **kw)
    self.norm_b = RMSNorm(d, eps=m.norm_eps, dtype=self.dtype, param_dtype=pdt)
    self.mlp = SwiGLU(d, mlp_hidden_size(cfg), residual_scale=residual_scale, **kw)
    self.rngs = rngs["gumbel"].fork()

  @property
  def kernels(self) -> dict:
    """The ops' implementation and interpret arguments (plain attributes: a graphdef is
    hashed, a dict is not)."""
    return dict(implementation=self.kernel, interpret=self.interpret)

  def _inference_mask(self, scores, positions, segment_ids=None, prev_margin=None,
                      prev_ok=None, token_ids=None):
    """Evaluation and decoding selection (decision e).  scores: [batch, seq, 2], positions:
    [batch, seq] absolute positions; token_ids: [batch, seq] the input tokens (the draw's
    noise key) or None; prev_margin, prev_ok: [batch, window - 1] the margins of the tokens
    before these (a cache), oldest first -> [batch, seq] fp32 {0, 1}.
    Under context parallelism the previous device's margins are taken as a halo."""
    rule = self.inference_selection
    if rule == "sign":
      return ops.deterministic_selection(scores)
    if rule == "positional_gumbel":
      key = jax.random.fold_in(jax.random.key(_EVAL_NOISE_SEED), self.select_seed)
      return ops.positional_gumbel_selection(scores, key, positions, token_ids)
    if rule in ("window_rank", "window_expected"):
      b, l = scores.shape[:2]
      k = self.window - 1
      margin = (scores[..., 1] - scores[..., 0]).astype(jnp.float32)
      prev_margin = ops.left_halo(margin, k, before=prev_margin)
      prev_ok = ops.left_halo(jnp.ones((b, l), bool), k, before=prev_ok)
      prev_seg = None if segment_ids is None else ops.left_halo(segment_ids, k)
      return ops.window_rank_selection(scores, window=self.window,
                                       capacity=self.capacity if rule == "window_rank" else None,
                                       segment_ids=segment_ids, prev_margin=prev_margin,
                                       prev_ok=prev_ok, prev_segment_ids=prev_seg)
    if rule == "none":
      return jnp.zeros(scores.shape[:-1], jnp.float32)
    if rule == "all":
      return jnp.ones(scores.shape[:-1], jnp.float32)
    raise ValueError(f"sal.inference_selection={rule!r} is not a rule")

  def _select(self, scores, *, gumbel_key, tau, forced_rate=None, segment_ids=None,
              token_ids=None):
    """-> (mask, drawn) [batch, seq] fp32: the mask that mixes, and the gate's own selection,
    which the budget loss and the selected fraction count. They differ only in training
    during the dense-to-sparse warm-up (forced_rate, sal.dense_warmup_steps), where tokens
    the gate did not pick are also selected at that rate."""
    if self.select_all:
      ones = jnp.ones(scores.shape[:-1], jnp.float32)
      return ones, ones
    if self.deterministic:
      b, l = scores.shape[:2]
      # A packed document draws the noise it would draw alone: positions count from its start.
      positions = (jnp.broadcast_to(ops.tokens_before(l) + jnp.arange(l), (b, l))
                   if segment_ids is None else ops.document_positions(segment_ids))
      mask = self._inference_mask(scores, positions, segment_ids, token_ids=token_ids)
      if self.inference_capacity is not None:
        mask = ops.capped_selection(mask, window=self.window, capacity=self.inference_capacity,
                                    segment_ids=segment_ids)
      return mask, mask
    key = self.rngs() if gumbel_key is None else gumbel_key
    drawn = ops.straight_through_gumbel(scores, key, tau=self.tau if tau is None else tau)
    if forced_rate is None:
      return drawn, drawn
    return ops.forced_selection(drawn, jax.random.fold_in(key, 1), forced_rate), drawn

  def _qkv(self, x, positions):
    return self._heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), positions)

  def _heads(self, q, k, v, positions):
    """Projections [b, l, d_model] -> q, k, v [b, l, heads, head_dim], RoPE at positions."""
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.head_dim)
    q, k, v = split(q), split(k), split(v)
    if self.rope:
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
    return q, k, v

  @staticmethod
  def _mix_weight(mask, scores):
    """eq. 5's weight of the attention output: mask * alpha, alpha = softmax(scores)[1]."""
    return mask * jax.nn.softmax(scores, axis=-1)[..., 1]

  def _mix(self, h, mask, scores, o):
    """eq. 5: selected tokens move to (1 - alpha) h + alpha o; the others keep h exactly.
    o: the attention's output projection."""
    return h + self._mix_weight(mask, scores)[..., None] * (o.astype(jnp.float32) - h)

  def _mix_and_mlp(self, h, mask, scores, attn):
    h = self._mix(h, mask, scores, self.o_proj(attn.reshape(*attn.shape[:-2], -1)))
    return h + self.mlp(self.norm_b(h)).astype(jnp.float32)       # eq. 6, every token

  def init_cache(self, batch_size: int) -> SALCache:
    shape = (batch_size, self.window, self.heads, self.head_dim)
    flags = jnp.zeros((batch_size, self.window), bool)
    return SALCache(k=jnp.zeros(shape, self.dtype), v=jnp.zeros(shape, self.dtype),
                    filled=flags, kept=flags, margin=jnp.zeros(flags.shape, jnp.float32),
                    pos=jnp.zeros((batch_size,), jnp.int32))

  def _cache_in_order(self, cache: SALCache):
    """The ring buffer as the `window` positions before cache.pos, oldest first:
    k, v [batch, window, heads, head_dim]; filled, kept [batch, window] bool; margin
    [batch, window] fp32."""
    w = self.window
    slots = (cache.pos[:, None] - w + jnp.arange(w)[None, :]) % w          # [b, w]
    return tuple(_take_rows(t, slots)
                 for t in (cache.k, cache.v, cache.filled, cache.kept, cache.margin))

  def _ring(self, k, v, filled, kept, margin, pos):
    """The cache after a sequence. k, v, filled, kept, margin: [batch, n, ...] the last
    n >= window positions, oldest first, ending at position pos - 1 (pos: [batch]); slot =
    position % window."""
    w, n = self.window, k.shape[1]
    first = pos - w                                                         # [b]
    index = (n - w) + (jnp.arange(w)[None, :] - first[:, None]) % w         # [b, w]
    return SALCache(k=_take_rows(k, index).astype(self.dtype),
                    v=_take_rows(v, index).astype(self.dtype), filled=_take_rows(filled, index),
                    kept=_take_rows(kept, index), margin=_take_rows(margin, index),
                    pos=pos.astype(jnp.int32))

  def __call__(self, h, *, token_mask=None, segment_ids=None, gumbel_key=None, tau=None,
               forced_rate=None, cache: SALCache | None = None, return_cache: bool = False,
               token_ids=None) -> LayerOutput:
    """h: [batch, seq, d_model]; token_mask: [batch, seq] bool real tokens (for the fraction).
    forced_rate: training only, scalar: also select each token with this probability (the
      dense-to-sparse warm-up, sal.dense_warmup_steps); None: the gate alone.
    token_ids: [batch, seq] the model's input tokens, which key the inference draw's noise
      (LanguageModel passes them; None keys it by position alone).

    segment_ids: optional [batch, seq] int (packed documents): attention stays inside a
      segment. RoPE keeps absolute positions: it only sees differences, so an offset
      document gets the same scores.
    cache: continue a sequence from this cache (evaluation mode): the rows attend to its
      keys too, and positions start at cache.pos.
    Returns LayerOutput(h, aux, cache or None) (models/layer.py).
    """
    if segment_ids is not None and (return_cache or cache is not None):
      raise ValueError("a decode cache continues one document: segment_ids cannot be combined "
                       "with cache or return_cache; prefill each document in its own row")
    b, l, _ = h.shape
    x = self.norm_a(h)
    scores = self.gate(x)                                   # [b, l, 2]
    if cache is None and not return_cache:
      mask, drawn = self._select(scores, gumbel_key=gumbel_key, tau=tau,
                                 forced_rate=forced_rate, segment_ids=segment_ids,
                                 token_ids=token_ids)
      selected = mask > 0.5
      # Under context parallelism, positions in the whole row (the halo keys carry theirs).
      positions = jnp.broadcast_to(ops.tokens_before(l) + jnp.arange(l), (b, l))
      q, k, v = self._qkv(x, positions)
      # Only selected rows are attended: unselected rows come back as zeros, and their h is
      # left as it was by the mix below (the straight-through gradient there sees o = 0).
      # With straight_through='attention' every row is attended in training: the forward is
      # the same (the mix weight of an unselected row is 0), but the gradient of its mask
      # sees the attention output it would have got.
      rows = selected
      if self.straight_through == "attention" and not self.deterministic:
        rows = jnp.ones_like(selected)
      attn = ops.selective_window_attention(
          q, k, v, rows, window=self.window,
          kv_select=selected if self.kv_selected_only else None, segment_ids=segment_ids,
          **self.kernels)
      out = self._mix_and_mlp(h, mask, scores, attn)
      return LayerOutput(out, {"mask": mask, "mix": self._mix_weight(mask, scores),
                               "fraction": ops.selected_fraction(drawn, token_mask)}, None)
    if not self.deterministic:
      raise ValueError("cache / return_cache is for evaluation and decoding: call model.eval() "
                       "first (training selection is random)")
    if cache is None:
      cache = self.init_cache(b)
    k_prev, v_prev, filled_prev, kept_prev, margin_prev = self._cache_in_order(cache)
    margin = (scores[..., 1] - scores[..., 0]).astype(jnp.float32)
    if self.select_all:
      mask = jnp.ones((b, l), jnp.float32)
    else:
      mask = self._inference_mask(
          scores, cache.pos[:, None] + ops.tokens_before(l) + jnp.arange(l)[None, :],
          prev_margin=margin_prev[:, 1:], prev_ok=filled_prev[:, 1:], token_ids=token_ids)
      if self.inference_capacity is not None:
        # The cap counts the cached window's kept tokens too; re-capping them keeps them all
        # (they already met the cap with more history), so only the new tokens can change.
        raw = jnp.concatenate([kept_prev.astype(mask.dtype), mask], axis=1)
        mask = ops.capped_selection(raw, window=self.window,
                                    capacity=self.inference_capacity)[:, self.window:]
    selected = mask > 0.5
    positions = cache.pos[:, None] + ops.tokens_before(l) + jnp.arange(l)[None, :]
    q, k, v = self._qkv(x, positions)
    # The `window` tokens before these: the cache, or under context parallelism (on every
    # device but the first) the previous device's last `window` tokens.
    w = self.window
    margin_prev = ops.left_halo(margin, w, before=margin_prev)
    k_prev = ops.left_halo(k.astype(self.dtype), w, before=k_prev)
    v_prev = ops.left_halo(v.astype(self.dtype), w, before=v_prev)
    kept_prev = ops.left_halo(selected, w, before=kept_prev & filled_prev)   # implies filled
    filled_prev = ops.left_halo(jnp.ones((b, l), bool), w, before=filled_prev)
    prefix_ok = kept_prev if self.kv_selected_only else filled_prev
    attn = ops.attention_with_prefix(
        q, k, v, selected, k_prefix=k_prev, v_prefix=v_prev, prefix_ok=prefix_ok,
        window=w, kv_select=selected if self.kv_selected_only else None,
        **self.kernels)
    out = self._mix_and_mlp(h, mask, scores, attn)
    aux = {"mask": mask, "mix": self._mix_weight(mask, scores),
           "fraction": ops.selected_fraction(mask, token_mask)}
    if not return_cache:
      return LayerOutput(out, aux, None)
    new = self._ring(jnp.concatenate([k_prev, k.astype(self.dtype)], axis=1),
                     jnp.concatenate([v_prev, v.astype(self.dtype)], axis=1),
                     jnp.concatenate([filled_prev, jnp.ones((b, l), bool)], axis=1),
                     jnp.concatenate([kept_prev, selected], axis=1),
                     jnp.concatenate([margin_prev, margin], axis=1),
                     cache.pos + ops.rows_length(l))
    return LayerOutput(out, aux, jax.tree.map(ops.from_last_device, new))

  selects = True

  def split_refusal(self) -> str | None:
    if not self.deterministic:
      return ("context-parallel forward needs deterministic selection; fix: call "
              "model.eval() first")
    if self.inference_capacity is not None:
      return ("sal.inference_capacity counts selections over each window, which context "
              "parallelism does not carry across devices; fix: leave it unset")
    return None

  def step(self, h, cache: SALCache, token_ids=None) -> LayerOutput:
    """One token per row, deterministic selection.  h: [batch, d_model] -> LayerOutput(h,
    {'mask'}, cache). token_ids: [batch] the input tokens (the inference draw's noise key,
    as in __call__).

    Four launches on the kernel path besides the SwiGLU's: norm_a, q, k, v and (a one-layer
    gate) the gate's scores in one call (ops.norm_matvec); the ring buffer's append with the
    attention (ops.ring_decode_attention, two kernels); the output projection with the mix of
    eq. 5 (norm_matvec's residual and mix).
    """
    b, _ = h.shape
    projections = (self.q_proj.kernel[...], self.k_proj.kernel[...], self.v_proj.kernel[...])
    if self.gate.hidden is None:      # the gate reads norm_a(h) rounded to the compute dtype, as q, k, v do
      *qkv, scores = ops.norm_matvec(
          h, self.norm_a.weight[...], projections + (self.gate.out.kernel[...],),
          eps=self.norm_a.eps, dtype=self.dtype,
          product_dtypes=(self.dtype,) * 3 + (jnp.dtype(self.gate.out.dtype),),
          **self.kernels)
      scores = (scores + self.gate.out.bias[...]).astype(jnp.float32)        # [b, 2]
    else:
      scores = self.gate(self.norm_a(h))
      qkv = ops.norm_matvec(h, self.norm_a.weight[...], projections, eps=self.norm_a.eps,
                            dtype=self.dtype, **self.kernels)
    margin = scores[:, 1] - scores[:, 0]
    slot = cache.pos % self.window                 # holds token pos - window, which leaves
    if self.select_all:
      mask = jnp.ones((b,), jnp.float32)
    elif self.inference_selection in ("window_rank", "window_expected"):
      others = cache.filled.at[jnp.arange(b), slot].set(False)
      mask = ops.window_rank_step(
          margin, cache.margin, others,
          capacity=self.capacity if self.inference_selection == "window_rank" else None)
    else:
      mask = self._inference_mask(scores[:, None], cache.pos[:, None],
                                  token_ids=None if token_ids is None else token_ids[:, None])[:, 0]
    if self.inference_capacity is not None and not self.select_all:
      # Tokens pos-window+1 .. pos-1 are the filled slots other than the one being replaced.
      others = cache.kept.at[jnp.arange(b), slot].set(False)
      mask = mask * (jnp.sum(others, axis=-1) < self.inference_capacity)
    q, k, v = self._heads(*(t[:, None] for t in qkv), cache.pos[:, None])
    attn, (ck, cv, filled, kept, pos) = ops.ring_decode_attention(
        q[:, 0], k[:, 0].astype(self.dtype), v[:, 0].astype(self.dtype), cache.k, cache.v,
        cache.filled, cache.kept, cache.pos, mask, kv_selected_only=self.kv_selected_only,
        **self.kernels)
    mixed = ops.norm_matvec(attn.reshape(b, -1), None, self.o_proj.kernel[...],
                            dtype=self.dtype, residual=h, mix=self._mix_weight(mask, scores),
                            **self.kernels)          # _mix(h, mask, scores, o)
    out = self.mlp.step(mixed, self.norm_b, **self.kernels)
    margins = cache.margin.at[jnp.arange(b), slot].set(margin)
    return LayerOutput(out, {"mask": mask}, SALCache(k=ck, v=cv, filled=filled, kept=kept,
                                                     margin=margins, pos=pos))
