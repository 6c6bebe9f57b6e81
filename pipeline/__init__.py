"""prunelab: make LLMs smaller for real — structured pruning into dense Hugging Face models.

``import prunelab`` is cheap (nothing heavy is imported until used); the API is

- ``prunelab.run(recipe, overrides=...)`` — a recipe (path, shipped name or dict) end to end, returns its metrics;
- ``prunelab.prune(model, tokenizer, calibration=..., criterion=..., **settings)`` — a model in memory;
- ``prunelab.load(path)`` — any export.

See ``docs/api.md``; the CLI is ``prunelab run | validate | ls | cp | bench | version``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["PruneResult", "__version__", "load", "load_recipe", "prune", "run"]


def __getattr__(name: str) -> Any:
    """The API lives in ``api``; importing it here lazily keeps ``import prunelab`` and ``prunelab version`` fast."""
    if name in ("run", "prune", "load", "load_recipe", "PruneResult"):
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
