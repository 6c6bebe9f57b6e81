"""Surgery: applying a plan to a model (slicing, block removal, merges) and compensation of removed units."""
