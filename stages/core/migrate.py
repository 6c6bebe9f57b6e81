"""Version 1 of the prune settings: one flat mapping of 19 keys for every mode (commit 0f1500b). The one home of
the version-1 migration of selection settings: the prune stage, the iterate stage and ``plan.json`` (a width plan's
target) read old spellings through it. Plain dicts only, so every room may import it.

``migrate`` rewrites the old spelling into the typed one, so old recipes and the ``recipe.resolved.yaml`` of old run
directories still validate; ``v1_settings`` gives back exactly what the flat class dumped, so the settings hash of an
old run directory still matches and ``--resume`` re-uses its stages.

    old key                              new spelling
    units: width + hidden: true          units: hidden (attention: none and mlp: false, which it required, dropped)
    hidden: false                        (dropped: the mode is `units`)
    hidden_norm_rescale                  norm_rescale (units: hidden)
    owl_m, owl_lambda                    allocation: {type: owl, m, lambda}
    alpha_epsilon                        allocation: {type: alpha, epsilon}
    damping, optimal_bias                compensation: {type: optimal, damping, bias}

An old key whose allocation or compensation is another type is refused with its new spelling, except in a complete
version-1 dump (all 19 keys: the old code's own ``recipe.resolved.yaml``), where the settings that did not apply to
the mode were ignored by the old code and are dropped here too.
"""

from __future__ import annotations

from typing import Any

V1_DEFAULTS: dict[str, Any] = {
    "type": "prune", "units": "blocks", "criterion": None, "num_blocks": None, "ratio": None, "rounding": "nearest",
    "layer_ratio": None, "allocation": "uniform", "alpha_epsilon": 0.08, "owl_m": 5.0, "owl_lambda": 0.08, "layers": None,
    "attention": "kv_group", "mlp": True, "hidden": False, "hidden_norm_rescale": True, "compensation": "none",
    "damping": 0.01, "optimal_bias": True,
}  # in the old field order, which the old dump kept
OLD_ONLY = ("hidden", "hidden_norm_rescale", "alpha_epsilon", "owl_m", "owl_lambda", "damping", "optimal_bias")
_FOLDS = {  # old key → (the field it moved into, the type it belongs to, its name there)
    "owl_m": ("allocation", "owl", "m"), "owl_lambda": ("allocation", "owl", "lambda"),
    "alpha_epsilon": ("allocation", "alpha", "epsilon"),
    "damping": ("compensation", "optimal", "damping"), "optimal_bias": ("compensation", "optimal", "bias"),
}


def _type_of(value: Any, default: str) -> Any:
    return value if isinstance(value, str) else value.get("type") if isinstance(value, dict) else default if value is None else None


def fold(data: dict[str, Any], keys: tuple[str, ...] = tuple(_FOLDS)) -> dict[str, Any]:
    """Move old flat allocation / compensation settings into their tagged mapping, where the type matches."""
    out = dict(data)
    for old in keys:
        if old not in out:
            continue
        field, kind, name = _FOLDS[old]
        current = out.get(field)
        if _type_of(current, {"allocation": "uniform", "compensation": "none"}[field]) != kind:
            continue  # left in place: refused (or, in a version-1 dump, dropped) with its new spelling
        node = dict(current) if isinstance(current, dict) else {"type": kind}
        if name in node:
            raise ValueError(f"{old} and {field}.{name} both given; keep {field}: {{type: {kind}, {name}: ...}}")
        node[name] = out.pop(old)
        out[field] = node
    return out


def migrate(data: Any, fields: dict[str, set[str]]) -> Any:
    """The typed spelling of version-1 prune settings (see the module doc); new-spelling input is returned as is.

    ``fields``: each mode's allowed keys, to drop what a complete version-1 dump carried for other modes."""
    if not isinstance(data, dict) or not any(k in data for k in OLD_ONLY):
        return data
    out = dict(data)
    dump = set(V1_DEFAULTS) <= set(out)
    units = out.get("units", "blocks")
    if out.pop("hidden", False):
        if units == "width":
            units = out["units"] = "hidden"
            if out.get("attention", "none") != "none" or out.get("mlp", False):
                raise ValueError("hidden channels are pruned on their own (LLM-Pruner's channel mode): set attention: none "
                                 "and mlp: false (better: write units: hidden without them)")
            out.pop("attention", None)
            out.pop("mlp", None)
        elif not dump:
            raise ValueError("hidden: true is the version-1 spelling of units: hidden; write units: hidden")
    if "hidden_norm_rescale" in out and units == "hidden":
        if "norm_rescale" in out:
            raise ValueError("hidden_norm_rescale and norm_rescale both given; keep norm_rescale")
        out["norm_rescale"] = out.pop("hidden_norm_rescale")
    out = fold(out)
    if dump and units in fields:
        out = {k: v for k, v in out.items() if k in fields[units]}
    return out


def explain_old(key: str, units: str) -> str | None:
    """Why a version-1 key left over by ``migrate`` is refused, with its new spelling."""
    if key in _FOLDS:
        field, kind, name = _FOLDS[key]
        where = "" if units == "width" else "; set units: width"
        return f"{key} is the version-1 spelling of {field}: {{type: {kind}, {name}: ...}} and applies only to {field}: {kind}{where}"
    if key == "hidden_norm_rescale":
        return "hidden_norm_rescale is the version-1 spelling of norm_rescale, a setting of units: hidden"
    if key == "hidden":
        return "hidden is the version-1 spelling of units: hidden"
    return None


def v1_settings(cfg: Any) -> dict[str, Any]:
    """What the flat version-1 class dumped (``model_dump(mode="json")``) for the same settings: all 19 keys, old
    defaults for what does not apply to the mode, in the old order."""
    if cfg.units not in ("blocks", "width", "hidden"):  # a mode version 1 did not have: its own settings are its hash
        return dict(cfg.model_dump(mode="json"))
    out = dict(V1_DEFAULTS, type=getattr(cfg, "type", "prune"), criterion=cfg.criterion, ratio=cfg.ratio)
    if cfg.units == "blocks":
        out.update(num_blocks=cfg.num_blocks, rounding=cfg.rounding)
    elif cfg.units == "width":
        alloc, comp = cfg.allocation, cfg.compensation
        out.update(units="width", layer_ratio=cfg.layer_ratio, allocation=alloc.type, attention=cfg.attention, mlp=cfg.mlp,
                   layers=list(cfg.layers) if cfg.layers is not None else None, compensation=comp.type)
        if alloc.type == "owl":
            out.update(owl_m=alloc.m, owl_lambda=alloc.lambda_)
        elif alloc.type == "alpha":
            out.update(alpha_epsilon=alloc.epsilon)
        if comp.type == "optimal":
            out.update(damping=comp.damping, optimal_bias=comp.bias)
        out.update({k: v for k, v in (("engines", cfg.engines), ("round_to", cfg.round_to))  # later settings: a run
                    if v != cfg.LATER_FIELDS[k]})  # made before them never stands for one that uses them
    else:
        out.update(units="width", layer_ratio=cfg.layer_ratio, attention="none", mlp=False, hidden=True,
                   hidden_norm_rescale=cfg.norm_rescale)
    return out
