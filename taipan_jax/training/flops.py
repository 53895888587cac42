"""Analytic FLOP counts of the LanguageModel and the peak rates to turn them into MFU.

Conventions (docs/spec.md section 9):
- 2 FLOPs per multiply-add; only matrix products are counted (projections, the Mamba-2
  convolution taps, the SSD contractions, attention scores and values, the LM head).
  Norms, activations, softmax, RoPE, the gate's Gumbel noise and the residual adds are
  elementwise and left out, as in the PaLM / MaxText MFU formulas. The embedding lookup is a
  gather and costs nothing; the LM head is a [d_model, padded_vocab] matmul whether or not it
  is tied to the embedding, so it always counts.
- Attention is counted over the keys each query is allowed to see under its causal mask:
  query i of a full attention layer sees i + 1 keys (mean (L + 1) / 2 over a sequence of
  L tokens, the MaxText causal convention), and query i of a SAL sees min(i + 1, window)
  keys (mean w - w (w - 1) / (2 L) for L >= w, tending to docs/spec.md section 9's 4 w d FLOPs per
  token as L grows). A SAL with window >= L therefore costs exactly what a full attention
  layer does. The SAL's attention is counted DENSE: every query, selected or not, because
  the current XLA path (`ops.selective_window_attention`) computes all query rows and zeroes
  the unselected ones afterwards. A kernel that computes only the selected rows would do
  about capacity * that (docs/spec.md section 9), so MFU from this count overstates such a kernel's
  useful work.
- What the XLA path executes is more than this count: it computes the masked-out half of
  the causal score block too (an L x L block for full attention and short SAL inputs,
  2 * max(window, 64) keys per query beyond that), and the SSD's intra-chunk block is a full
  Q x Q square (counted here in full, as docs/spec.md section 9 does and as Mamba-2 kernels compute
  it). tests/test_training_flops.py compares these counts with XLA's own.
- Training = 3 x forward: the backward pass costs twice the forward (one product for the
  input gradient and one for the weight gradient per forward product), the convention of
  PaLM (Chowdhery et al. 2022, appendix B) and MaxText's MFU. Rematerialised forward work is
  not counted, so this is model FLOPs utilisation, not hardware FLOPs utilisation.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from taipan_jax.config import layer_kinds, mlp_hidden_size, padded_vocab_size

# --- FLOP counts -----------------------------------------------------------------------------


def mean_causal_keys(seq_len: int, window: int) -> float:
  """Mean over positions i < seq_len of min(i + 1, window): keys a causal window query sees."""
  if seq_len <= 0:
    raise ValueError(f"seq_len must be > 0, got {seq_len}")
  w = min(window, seq_len)
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def forward_flops_breakdown(cfg, seq_len: int) -> dict[str, float]:
  """Forward FLOPs per token of a validated config's LanguageModel, by part, summed over layers.

  Keys: mamba_proj (in_proj + out_proj), mamba_conv, ssd, sal_gate, sal_proj (Q K V O),
  sal_attention, attention_proj (Q K V O), attention, mlp (SwiGLU of 's' and 'a' layers),
  lm_head. Parts of layer kinds the pattern lacks are 0.
  """
  m, mb, sal = cfg.model, cfg.mamba, cfg.sal
  d = m.d_model
  kinds = layer_kinds(cfg)
  n_m, n_s, n_a = kinds.count("m"), kinds.count("s"), kinds.count("a")
  parts = dict.fromkeys(("mamba_proj", "mamba_conv", "ssd", "sal_gate", "sal_proj",
                         "sal_attention", "attention_proj", "attention", "mlp", "lm_head"), 0.0)

  if n_m:
    d_inner = mb.expand * d
    heads = d_inner // mb.head_dim
    gn = mb.n_groups * mb.d_state
    conv_dim = d_inner + 2 * gn
    # in_proj: d -> z | x B C | dt; out_proj: d_inner -> d.
    parts["mamba_proj"] = n_m * (2 * d * (d_inner + conv_dim + heads) + 2 * d_inner * d)
    parts["mamba_conv"] = n_m * 2 * mb.d_conv * conv_dim
    # SSD (ops.ssd), per token: C.B over the chunk (Q G N) and the scores times x (Q H P),
    # both a full Q x Q block; each chunk's state from its inputs and the incoming state read
    # by C (2 H P N each). The chunk-to-chunk scan is elementwise. An input shorter than a
    # chunk only has seq_len positions to mix.
    q = min(mb.chunk_size, seq_len)
    p, g, n = mb.head_dim, mb.n_groups, mb.d_state
    parts["ssd"] = n_m * (2 * q * g * n + 2 * q * heads * p + 4 * heads * p * n)

  if n_s:
    gh = sal.gate_hidden
    parts["sal_gate"] = n_s * (2 * d * gh + 2 * gh * 2 if gh else 2 * d * 2)
    parts["sal_proj"] = n_s * 8 * d * d
    # q.k and p.v, 2 FLOPs each per (key, d_model channel): dense over all queries.
    parts["sal_attention"] = n_s * 4 * d * mean_causal_keys(seq_len, sal.window)

  if n_a:
    parts["attention_proj"] = n_a * 8 * d * d
    parts["attention"] = n_a * 4 * d * mean_causal_keys(seq_len, seq_len)

  parts["mlp"] = (n_s + n_a) * 6 * d * mlp_hidden_size(cfg)
  # The head multiplies by every padded vocabulary row; the logits are sliced afterwards.
  parts["lm_head"] = 2 * d * padded_vocab_size(cfg)
  return {k: float(v) for k, v in parts.items()}


def forward_flops_per_token(cfg, seq_len: int) -> float:
  """Analytic forward FLOPs per token at sequence length seq_len (module docstring)."""
  return sum(forward_flops_breakdown(cfg, seq_len).values())


def train_flops_per_token(cfg, seq_len: int) -> float:
  """FLOPs per token of one training step: 3 x forward (backward = 2 x forward, no remat)."""
  return 3.0 * forward_flops_per_token(cfg, seq_len)


# --- peak rates ------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) peaks in FLOP/s, per chip, keyed by matmul input type:
#   "bf16": bfloat16 / float16 tensor-core or MXU rate.
#   "fp32": the rate XLA's DEFAULT precision gives float32 dots. On Ampere and Hopper GPUs
#     that is TF32 on the tensor cores, on TPUs one bfloat16 MXU pass ("By default ...
#     float32 dot products may be computed with reduced-precision arithmetic internally
#     (bfloat16 on TPU, TF32 on recent GPUs)", docs.jax.dev/en/latest/201/precision.html).
#     Measured on an H100 80GB HBM3 with jax 0.11.2, 8192^3 float32 products: 412 TFLOP/s at
#     default precision (above the 67 TFLOP/s true-fp32 peak, so TF32), 52 TFLOP/s at
#     Precision.HIGHEST. The models' nnx.Linear projections and LM head (nearly all the
#     FLOPs) use the default precision; only ops.ssd / ops.attention ask for HIGHEST.
#   "fp32_highest": true float32 (Precision.HIGHEST); None on TPUs, which emulate it with
#     several bfloat16 passes and publish no rate for it.
# Sources:
#   H100 SXM5 / H200 (same GH100 compute, more HBM): NVIDIA H100 Tensor Core GPU datasheet
#     and Hopper architecture whitepaper, SXM5: BF16 989.4, TF32 494.7, FP32 66.9 TFLOPS
#     dense (datasheet lists 1979 / 989 "with sparsity"); the H200 datasheet lists the same
#     BF16 / TF32 / FP32 figures as H100 SXM. H100 PCIe: BF16 756, TF32 378, FP32 51.
#   A100 (SXM4 and PCIe, 40 and 80 GB): NVIDIA A100 datasheet: BF16 312, TF32 156, FP32 19.5.
#   TPU "Peak compute per chip (bf16)", cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}:
#     v4 275, v5e 197, v5p 459, v6e (Trillium) 918 TFLOPs.
_PEAKS: dict[str, dict[str, float | None]] = {
    "h100_sxm": {"bf16": 989.4e12, "fp32": 494.7e12, "fp32_highest": 66.9e12},
    "h100_pcie": {"bf16": 756.0e12, "fp32": 378.0e12, "fp32_highest": 51.0e12},
    "a100": {"bf16": 312.0e12, "fp32": 156.0e12, "fp32_highest": 19.5e12},
    "tpu_v4": {"bf16": 275.0e12, "fp32": 275.0e12, "fp32_highest": None},
    "tpu_v5e": {"bf16": 197.0e12, "fp32": 197.0e12, "fp32_highest": None},
    "tpu_v5p": {"bf16": 459.0e12, "fp32": 459.0e12, "fp32_highest": None},
    "tpu_v6e": {"bf16": 918.0e12, "fp32": 918.0e12, "fp32_highest": None},
}


def _chip(device_kind: str) -> str | None:
  """The _PEAKS key of a jax Device.device_kind string, or None for CPUs and unknown kinds.

  Seen kinds: 'NVIDIA H100 80GB HBM3', 'NVIDIA H100 PCIe', 'NVIDIA H200',
  'NVIDIA A100-SXM4-80GB', 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' / 'TPU v5p',
  'TPU v6 lite' (v6e), 'cpu'.
  """
  k = device_kind.lower()
  if "h100" in k or "h200" in k:
    if "nvl" in k:              # NVL boards run at other clocks and power: not tabled
      return None
    return "h100_pcie" if "pcie" in k else "h100_sxm"
  if "a100" in k:
    return "a100"
  if "tpu" in k:
    if "v6" in k or "trillium" in k:
      return "tpu_v6e" if ("lite" in k or "v6e" in k or "trillium" in k) else None
    if "v5" in k:
      return "tpu_v5e" if ("lite" in k or "v5e" in k) else "tpu_v5p"
    if "v4" in k:
      return "tpu_v4"
  return None


def _dtype_key(dtype: Any) -> str:
  if isinstance(dtype, str):
    name = dtype.lower()
  else:                          # np.dtype, jnp.bfloat16 (a scalar type with .dtype), ...
    try:
      name = np.dtype(getattr(dtype, "dtype", dtype)).name
    except TypeError:
      name = str(dtype)
  if name in ("bfloat16", "bf16", "float16", "fp16", "half"):
    return "bf16"
  if name in ("float32", "fp32", "f32"):
    return "fp32"
  if name in ("float32_highest", "fp32_highest", "highest"):
    return "fp32_highest"
  raise ValueError(f"dtype {dtype!r}: expected 'bfloat16', 'float16', 'float32' or "
                   "'float32_highest'")


def peak_flops_per_second(device, dtype) -> float | None:
  """Dense peak FLOP/s of one chip for matmuls in `dtype`, or None where unknown (CPU).

  device: a jax Device (its device_kind is read) or a device_kind string.
  dtype: the config's compute dtype, e.g. cfg.model.dtype: 'bfloat16' / 'float16', or
    'float32' (the rate of XLA's default-precision fp32 dots: TF32 on A100 / H100 / H200,
    one bf16 pass on TPUs), or 'float32_highest' (true fp32, Precision.HIGHEST).
  """
  kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
  key = _dtype_key(dtype)
  chip = _chip(kind)
  return None if chip is None else _PEAKS[chip][key]


def mfu(tokens_per_second_per_device: float, flops_per_token: float,
        peak: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s per device / peak; None when peak is unknown.

  flops_per_token: train_flops_per_token for training steps, forward_flops_per_token for
  inference; tokens_per_second_per_device: global tokens per second / number of devices.
  """
  if peak is None or peak <= 0:
    return None
  return tokens_per_second_per_device * flops_per_token / peak
