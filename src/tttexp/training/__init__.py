"""The loop and what it uses: checkpoints, preemption, LR schedule, metrics, validation, inference timing, plots."""
