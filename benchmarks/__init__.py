"""Benchmarks: scripts that write JSON under benchmarks/results/ (run with `python -m benchmarks.<name>`)."""
