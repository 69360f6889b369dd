"""The run folder on disk: safe file I/O and the one torch.load, checkpoints, lock and lifecycle, resume
policy, the metrics log. May import: kith.utils and kith.config; never methods, training, evaluation."""
