"""Fixtures (synthetic groups and trees) that tests and benchmarks share."""
