"""The recipe: one run, from the config through every stage to the saved and published model (``aligner-train``)."""
