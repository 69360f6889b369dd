"""Images in, batches out: data sources, decoding, batched augmentation on the device, the loaders.
May import: kith.utils only."""
