"""Micro benchmarks of the hot paths (pytest-benchmark): ``make bench-micro``; not part of ``make test``."""
