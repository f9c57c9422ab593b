"""The student: building or loading the T5 (with the two-task loss around it), and its FLOPs."""
