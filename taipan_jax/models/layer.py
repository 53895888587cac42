"""The one interface every layer kind of the LanguageModel keeps (Mamba2Block,
SelectiveAttentionLayer, AttentionBlock), so the model and the context-parallel code never ask
which kind a layer is.

    layer(h, *, token_mask, segment_ids, gumbel_key, tau, forced_rate, cache, return_cache,
          token_ids)
        -> LayerOutput
    layer.step(h, cache, token_ids) -> LayerOutput   # one token per row, evaluation mode
    layer.init_cache(batch_size)                 # the empty decode cache
    layer.split_refusal() -> str | None          # why its length cannot be split over devices
    layer.selects: bool                          # draws Gumbel noise; aux holds its selection

Arguments a kind has no use for (a Mamba-2 block's token_mask, gumbel_key, tau, forced_rate,
token_ids) are accepted and ignored.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax


class LayerOutput(NamedTuple):
  """h: the residual stream after the layer, fp32 ([batch, seq, d_model]; step: [batch,
  d_model]). aux: a selecting layer's {'mask': [batch, seq], 'mix': [batch, seq] (eq. 5's
  weight of its attention output), 'fraction': [batch]} (step: 'mask' only), else empty.
  cache: the decode cache after these tokens, or None when not asked for."""
  h: jax.Array
  aux: dict
  cache: Any
