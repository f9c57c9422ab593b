"""cotmi_ds: chain-of-thought distillation with a mutual-information term, trained with DeepSpeed."""

__version__ = "0.1.0"
