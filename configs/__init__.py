"""Bundled configs; installed as `taipan_jax.configs` (see setup.py)."""
