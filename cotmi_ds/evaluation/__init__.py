"""Evaluation: generation, scoring by task kind, calibration, the results a run reports, `cotmi eval` and `cotmi report`."""
