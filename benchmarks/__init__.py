"""Benchmarks of the two-stage pipeline: `python -m benchmarks` (see benchmarks/bench.py)."""
