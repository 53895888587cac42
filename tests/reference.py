"""float64 views of the kernel packages' oracles (pallas_kernels/<op>/reference.py), the one
ground truth that the ops, the models and the kernels are all tested against."""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.selective_attention import selective_attention_reference
from pallas_kernels.ssd import ssd_reference


def _f64(*arrays):
  return [None if t is None else jnp.asarray(t, jnp.float64) for t in arrays]


def ssd_sequential(x, dt, A, B, C, initial_state=None, segment_ids=None):
  """The SSD recurrence in float64 numpy: y [b, l, h, p] and the final state [b, h, p, n]."""
  with jax.enable_x64(True):
    x, dt, A, B, C, init = _f64(x, dt, A, B, C, initial_state)
    y, state = ssd_reference(x, dt, A, B, C, initial_state=init,
                             segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
    return np.asarray(y), np.asarray(state)


def ssd_sequential_jax(x, dt, A, B, C, initial_state):
  """The same in jax, differentiable (call inside `jax.enable_x64(True)` for float64)."""
  return ssd_reference(x, dt, A, B, C, initial_state=initial_state)


def window_attention_dense(q, k, v, select, window, kv_select=None, segment_ids=None, xp=np):
  """Dense masked softmax attention; rows with no selected query or no key are 0.

  xp=np: float64 numpy. xp=jax.numpy (inside `jax.enable_x64(True)`): the same in float64
  jax, for reference gradients.
  """
  kw = dict(window=window, kv_select=None if kv_select is None else jnp.asarray(kv_select),
            segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
  if xp is np:
    with jax.enable_x64(True):
      return np.asarray(selective_attention_reference(*_f64(q, k, v), jnp.asarray(select),
                                                      **kw))
  return selective_attention_reference(q, k, v, select, **kw)
