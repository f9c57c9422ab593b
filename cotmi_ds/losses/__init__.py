"""Loss implementations. ``reference`` is the plain one and the ground truth for tests; ``fused``
computes the same values in chunks. Kept free of heavy imports: the CLI validates against these."""

LOSSES = ("fused", "reference")
MI_VARIANTS = ("paper", "masked")  # docs/method.md: the released formula, and one without its quirks
