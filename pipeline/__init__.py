"""Orchestration of the two stages and the CLI (`python -m pipeline`)."""
__version__ = "0.1.0"
