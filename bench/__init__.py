"""Benchmarks: `make bench` (or `python -m bench.run`) prints figures; nothing here asserts."""
