"""Everything that reads or shapes data: datasets, tokenizers, encoding, batching."""
