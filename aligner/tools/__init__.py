"""Tools beside a run: the memory estimate of a config before launching it (``aligner-estimate``)."""
