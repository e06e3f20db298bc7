"""Scoring: the attention kernels, the log-probs of a batch (chunked or full), sequence parallelism, cached scores."""
