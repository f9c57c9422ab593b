"""Running many jobs: `cotmi sweep` over a grid of flags."""
