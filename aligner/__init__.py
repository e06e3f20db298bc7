"""aligner: DeepSpeed ZeRO-3 preference alignment with a pluggy plugin registry."""

__version__ = "0.1.0"
