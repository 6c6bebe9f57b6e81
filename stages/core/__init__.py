"""What every room of the library shares and nothing else: the strict config base, the name → entry
registry, atomic file writes. Imports nothing from ``pipeline/`` or from a stage module."""
