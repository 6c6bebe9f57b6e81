"""Selection: typed settings (config; version-1 spelling in legacy), targets (ratio to counts), block selection,
width selection with its allocations (uniform, global; OWL in owl, AlphaPruning in alpha), and the plan builders."""
