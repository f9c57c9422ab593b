"""Same-run benchmarks (`cotmi bench ...`): the project against re-implementations of the release."""
