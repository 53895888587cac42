"""Input data: embedded synthetic tasks (MQAR)."""
from taipan_jax.data.mqar import mqar_batch

__all__ = ["mqar_batch"]
