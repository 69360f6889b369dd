"""Small shared helpers: user errors, device and precision, torch.distributed, RNG state, key metadata.
May import: torch, numpy and the standard library; nothing else of kith."""
