"""Evaluation: held-out losses and preference flips, generation, reward-model judging, the report of a run."""
