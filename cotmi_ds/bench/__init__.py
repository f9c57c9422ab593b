"""Benchmarks (`cotmi bench ...`): same-run comparisons that print their figures."""
