"""Benchmarks: `python -m bench.http_clients`, `python -m bench.overhead` (see README.md)."""
