"""Plain-JAX operations the models call. Kernels plug in behind these names."""
from taipan_jax.ops.context_parallel import (document_positions, from_last_device, left_halo,
                                             rows_length,
                                             sequence_axis, sequence_parallel, tokens_before)
from taipan_jax.ops.attention import (attention_with_prefix, ring_decode_attention,
                                      selective_window_attention, window_decode_attention)
from taipan_jax.ops.cross_entropy import linear_cross_entropy
from taipan_jax.ops.selection import (budget_loss, capped_selection, deterministic_selection,
                                      forced_selection, positional_gumbel_selection,
                                      selected_fraction, straight_through_gumbel,
                                      window_rank_selection, window_rank_step)
from taipan_jax.ops.decode import mamba2_in_proj, mamba2_ssm_out, norm_matvec
from taipan_jax.ops.dispatch import IMPLEMENTATIONS, Route, choose, target_platform
from taipan_jax.ops.ssd import ssd

__all__ = [
    "ssd", "norm_matvec", "mamba2_in_proj", "mamba2_ssm_out",
    "IMPLEMENTATIONS", "Route", "choose", "target_platform",
    "selective_window_attention", "attention_with_prefix", "window_decode_attention",
    "ring_decode_attention", "linear_cross_entropy",
    "straight_through_gumbel", "forced_selection", "deterministic_selection",
    "capped_selection",
    "positional_gumbel_selection", "window_rank_selection",
    "window_rank_step",
    "selected_fraction", "budget_loss", "left_halo", "sequence_axis", "sequence_parallel",
    "from_last_device", "tokens_before", "rows_length", "document_positions",
]
