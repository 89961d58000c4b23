"""Reference servers the benchmarks compare the real server against."""
