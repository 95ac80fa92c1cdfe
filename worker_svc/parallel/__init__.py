"""Tensor parallelism: a model sharded over several processes (ranks), one per device."""
