"""Selection: targets (ratio to counts), block selection, width allocations (uniform, global, OWL, AlphaPruning)."""
