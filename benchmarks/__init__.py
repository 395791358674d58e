"""Benchmarks of the two-stage pipeline: `python -m pipeline bench` (see benchmarks/bench.py)."""
