"""Loss implementations. ``reference`` is the plain one and the ground truth for tests."""
