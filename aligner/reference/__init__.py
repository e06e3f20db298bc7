"""The reference update: the trust-region operations on a reference model (full weights or LoRA adapters)."""
