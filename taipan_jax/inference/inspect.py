"""What each SAL does on an input: its selection, the attention map of the selected rows and
how much of the attention output it mixes into the residual stream.

For notebooks and analysis, not for speed: the attention weights are formed densely, a
[heads, seq, seq] array per SAL (use short inputs).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def sal_attention_maps(model, tokens):
  """tokens: [batch, seq] int32 -> list over SALs (in layer order) of dicts:
    select: [batch, seq] {0, 1} float, the deterministic selection (model in eval mode);
    weights: [batch, heads, seq, seq] fp32, row i = the softmax weights query i puts on
      keys i - window + 1 .. i (the kv_selected_only variant: selected keys only); rows of
      unselected tokens are zero, as they do not attend;
    mix: [batch, seq] fp32, eq. 5's weight of the attention output, select * alpha: 1 replaces
      the token's residual stream by the attention output, 0 leaves it as it was.
  The residual stream is carried through every layer exactly as in the forward pass.
  """
  model.eval()
  b, l = tokens.shape
  h = model.embed(tokens).astype(jnp.float32)
  maps = []
  for layer in model.layers:
    if layer.selects:
      x = layer.norm_a(h)
      scores = layer.gate(x)
      mask, _ = layer._select(scores, gumbel_key=None, tau=None, token_ids=tokens)
      q, k, _ = layer._qkv(x, jnp.broadcast_to(jnp.arange(l), (b, l)))
      i, j = jnp.arange(l)[:, None], jnp.arange(l)[None, :]
      allowed = (j <= i) & (j > i - layer.window)                    # [l, l]
      allowed = allowed[None] & (mask[:, :, None] > 0.5)             # rows: selected queries
      if layer.kv_selected_only:
        allowed = allowed & (mask[:, None, :] > 0.5)
      s = jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST) / math.sqrt(q.shape[-1])
      s = jnp.where(allowed[:, None], s, -jnp.inf)
      w = jax.nn.softmax(s, axis=-1)
      w = jnp.where(allowed[:, None], w, 0.0)
      maps.append({"select": mask, "weights": w, "mix": layer._mix_weight(mask, scores)})
    h = layer(h, token_ids=tokens).h
  return maps
