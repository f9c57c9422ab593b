"""Checkpoints: the on-disk layout and atomic publish, DeepSpeed save/load and resume, RNG state, and Hugging Face export."""
