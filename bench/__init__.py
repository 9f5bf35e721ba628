"""Benchmarks: run with `make bench` (or `python -m bench.run`); they print figures, never assert."""
