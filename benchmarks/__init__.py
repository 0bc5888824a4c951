"""Benchmarks: ``python -m benchmarks.step`` (train and inference steps) and its peers.

Each module is a command: the package sets what the project's commands set for their process
before NumPy or JAX is imported (``train.process``: freed host memory kept for reuse)."""

from train import process

process.keep_freed_host_memory()
