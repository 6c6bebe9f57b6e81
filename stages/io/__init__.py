"""The I/O room: model sources and aliases, model loading, text data, tiny models, the per-layer loader."""
