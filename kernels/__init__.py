"""Triton kernels (one op per file, each with its launcher) and their torch references."""
