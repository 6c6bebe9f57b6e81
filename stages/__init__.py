"""Pipeline stages. Importing this package registers every stage (and imports no torch)."""

from stages import calibrate, evaluate, export, prune, recover, score

__all__ = ["calibrate", "evaluate", "export", "prune", "recover", "score"]
