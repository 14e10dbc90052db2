"""Benchmarks: `python -m bench.suite`, `python -m bench.http_clients` (see README.md)."""
