"""Audit throughput and memory benchmark: `python -m benchmarks.audit` (see __main__.py)."""
