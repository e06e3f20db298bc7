"""Training: one step (scores to losses to rewards), its guards (non-finite, preemption, job lock), checkpoints, loggers."""
