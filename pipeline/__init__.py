"""prunelab: make LLMs smaller for real — structured pruning into dense Hugging Face models."""

__version__ = "0.1.0"
