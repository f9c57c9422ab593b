"""Training: the loop and its state, the DeepSpeed engine, stopping and exit codes, telemetry, the run directory, fault-injection points."""
