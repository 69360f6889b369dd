"""Training: setup (shared with `kith bench`), step, loop with its LoopState and Checkpointer, optim, finish.
May import: every library layer below it; never kith.tools, kith.api or kith.cli."""
