"""How much device memory a training run needs, per device, before it runs.

Two parts:
  * the training state (parameters, Adam moments, step counters), exact: each array's bytes
    divided by the devices its sharding splits it over;
  * everything else the step allocates (activations kept for the backward pass, gradients,
    temporaries), from XLA's own memory analysis of the compiled train step: the step is
    lowered and compiled for the current backend with abstract inputs, nothing runs and
    nothing is allocated. It follows the kernels and fusions the run will really use.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from taipan_jax.sharding.rules import shard_count
from taipan_jax.training import partition


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device."""
  params: int
  optimizer: int             # Adam moments and counters
  step_temporaries: int      # XLA temp buffers of the train step: activations, gradients
  tokens_per_device: int

  @property
  def total(self) -> int:
    # The state is donated to the step, so it is counted once; the step's outputs reuse it.
    return self.params + self.optimizer + self.step_temporaries

  @property
  def temporaries_per_token(self) -> float:
    return self.step_temporaries / max(self.tokens_per_device, 1)


def _bytes_on_one_device(abstract, sharding) -> int:
  return -(-abstract.size * np.dtype(abstract.dtype).itemsize // shard_count(sharding))


def estimate_training_memory(cfg, steps, plan) -> MemoryEstimate:
  """Per-device bytes of `steps.train_step` under `plan` (training/partition.py) at
  cfg.train.batch_size x cfg.data.seq_len."""
  state, shardings = steps.abstract_state, plan.state
  sizes = lambda tree, sh: sum(jax.tree.leaves(jax.tree.map(_bytes_on_one_device, tree, sh)))
  params = sizes(state.params, shardings.params)
  everything = sizes(state, shardings)
  b, l = cfg.train.batch_size, cfg.data.seq_len
  batch = {k: jax.ShapeDtypeStruct((b, l), dt) for k, dt in
           (("tokens", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
            ("segment_ids", np.int32))}
  compiled = partition.lower_train_step(steps, plan, batch).compile()
  analysis = compiled.memory_analysis()
  temp = int(getattr(analysis, "temp_size_in_bytes", 0)) if analysis is not None else 0
  return MemoryEstimate(params=params, optimizer=everything - params, step_temporaries=temp,
                        tokens_per_device=b * l // shard_count(plan.batch, 0))
