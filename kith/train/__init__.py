"""Training: one setup for the loop and `kith bench`, the step, the loop, optimiser, end-of-run eval.
May import: every library layer below it; never kith.tools, kith.api or kith.cli."""
