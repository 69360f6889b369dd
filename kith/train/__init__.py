"""Training: one setup for the loop, `kith bench` and the GPU benchmark (setup), the step (step), the
loop (loop), where it stands and what a checkpoint holds (state), when and how checkpoints are written
and restored (checkpointer), optimiser and schedule (optim), end-of-run eval (finish).
May import: every library layer below it; never kith.tools, kith.api or kith.cli."""
