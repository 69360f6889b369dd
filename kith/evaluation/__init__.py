"""Evaluating a backbone: kNN and linear probes; reading a backbone from any file kith accepts.
May import: utils, data, nn, memory, runs, config; never training, methods or the tools."""
