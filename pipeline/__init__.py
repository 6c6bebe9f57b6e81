"""prunelab: make LLMs smaller for real — structured pruning into dense Hugging Face models.

``import prunelab`` is cheap (nothing heavy is imported until used); the API is

- ``prunelab.run(recipe, overrides=...)`` — a recipe (path, shipped name or dict) end to end, returns its metrics;
- ``prunelab.prune(model, tokenizer, calibration=..., criterion=..., **settings)`` — a model in memory;
- ``prunelab.load(path)`` — any export.

See ``docs/api.md``; the CLI is ``prunelab run | validate | ls | cp | bench | version``.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["PruneResult", "__version__", "load", "load_recipe", "prune", "run"]


def __getattr__(name: str) -> Any:
    """The API lives in ``api``; importing it here lazily keeps ``import prunelab`` and ``prunelab version`` fast."""
    if name in _API:
        from prunelab import api  # lazy: startup

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """``prunelab.run`` is the API function, though ``run.py`` (the script behind ``accelerate launch
    pipeline/run.py``) is a submodule of the same name: importing a submodule sets it as an attribute of its
    package, which would turn ``prunelab.run`` into the module. The API names keep their functions; the module
    stays importable as always (``from prunelab.run import main``, ``sys.modules``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


_API = frozenset({"run", "prune", "load", "load_recipe", "PruneResult"})
sys.modules[__name__].__class__ = _Package
