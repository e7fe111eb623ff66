"""Benchmarks of the bridge against what a user would write instead (`python -m bench.run`)."""
