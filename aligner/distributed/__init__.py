"""Below every stage: which device a collective runs on, and ranks that act in lockstep (one answer, one error)."""
