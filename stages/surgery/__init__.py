"""Surgery: the typed plan (plan), applying it to a model (apply: slicing, block removal, merges) and compensation
of removed units (compensation)."""
