"""Architecture adapters: the only code that names a model family modules."""
