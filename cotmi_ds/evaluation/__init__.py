"""Evaluation: generation, scoring (safe arithmetic for equations), calibration, the results a run reports, `cotmi eval` and `cotmi report`."""
