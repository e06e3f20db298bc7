"""Scoring: the log-probs of a batch (chunked or full), the path a run scores on, sequence parallelism, cached scores."""
