"""Pallas kernels for Taipan's hot paths. Standalone: imports jax only, knows no model."""
