"""Benchmarks: ``python -m benchmarks.step`` (train and inference steps) and its peers."""
