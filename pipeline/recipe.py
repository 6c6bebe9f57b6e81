"""Recipe schema: YAML (+ CLI dotlist) → OmegaConf → plain dict → pydantic, every error at once.

Nothing here imports torch: validating a recipe must take well under two seconds so that a typo is
reported before any model or data is touched. Stage config classes live beside their stages
(``stages/<name>.py``) and are stitched into one discriminated union on ``type`` at first use.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, grammar_parser
from omegaconf.errors import OmegaConfBaseException
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
from pydantic import BaseModel, Field, Tag, ValidationError, create_model, field_validator, model_validator

from prunelab.registry import STAGES, listed_stage_types, load_stages
from prunelab.stages.core.config import PathStr, StrictModel
from prunelab.stages.core.registry import tagged_union
from prunelab.stages.io.config import ModelConfig, TextSource

__all__ = ["ModelConfig", "RecipeBase", "RecipeError", "StrictModel", "TextSource", "load_recipe", "validate"]

STAGE_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_run_name(name: str) -> str:
    """A run name is one plain folder name, so ``<output_dir>/<name>`` stays inside ``output_dir``."""
    if RUN_NAME.match(name) and ".." not in name:
        return name
    fixed = re.sub(r"[^A-Za-z0-9._-]+", "-", name).replace("..", "").strip(".-_") or "my-run"
    raise ValueError(
        f"{name!r} is not a plain folder name; use letters, digits, '.', '_' and '-' only, starting with a letter "
        f"or digit (no '/', '\\' or '..': the run directory is <output_dir>/<name>), e.g. name: {fixed}"
    )


class RecipeBase(StrictModel):
    """Fields every recipe has. ``stages`` is added by :func:`recipe_model` once stages register."""

    name: str = Field(..., description="run name, one plain folder name; the run directory is <output_dir>/<name>")
    seed: int = Field(0, description="seed for sampling, random criteria and torch")
    output_dir: PathStr = Field("runs", description="parent folder of run directories")
    model: ModelConfig

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        return check_run_name(name)

    @property
    def run_dir(self) -> Path:
        """``<output_dir>/<name>``, which validation guarantees is a folder directly inside ``output_dir``."""
        return Path(self.output_dir) / self.name

    def resolved(self) -> dict[str, Any]:
        """The recipe as plain data with every default filled in, each stage dumped by its OWN class: pydantic
        serialises a value by the field's declared type, so dumping the whole recipe would drop the fields of a
        stage whose settings are a subclass chosen at validation (prune: blocks | width | hidden)."""
        out = self.model_dump(mode="json", exclude={"stages"})
        out["stages"] = {key: cfg.model_dump(mode="json") for key, cfg in self.stages.items()}
        return out

    @model_validator(mode="after")
    def _run_dir_inside(self) -> RecipeBase:
        base = Path(os.path.normpath(self.output_dir or "."))
        target = Path(os.path.normpath(base / self.name))
        if target.parent != base:
            raise ValueError(f"name: the run directory {target} would not be a folder directly inside output_dir "
                             f"{self.output_dir!r}; give name a plain folder name")
        return self

    @model_validator(mode="after")
    def _cross_stage_rules(self) -> RecipeBase:
        stages: dict[str, Any] = self.stages
        errors: list[str] = []
        seen: list[str] = []
        for key, cfg in stages.items():
            if not STAGE_KEY.match(key):
                errors.append(f"stages.{key}: stage names use letters, digits, '_' or '-' and start with a letter")
            check = getattr(cfg, "check_order", None)
            if check is not None:
                errors.extend(f"stages.{key}: {msg}" for msg in check(key, seen, stages))
            seen.append(key)
        errors.extend(self.model.check_stages(stages))  # model.load: streaming allows fewer stages
        exports = [key for key, cfg in stages.items() if getattr(cfg, "type", None) == "export"]
        for key in exports[1:]:
            errors.append(f"stages.{key}: a second export stage would overwrite model/ written by stages.{exports[0]}; "
                          f"keep one export stage (at the end)")
        if errors:
            raise ValueError("; ".join(errors))
        return self


@functools.cache
def recipe_model() -> type[RecipeBase]:
    """Build the Recipe class with ``stages`` as an ordered mapping of the registered stage configs."""
    load_stages()

    union = tagged_union(STAGES, names=listed_stage_types(), frozen=True)  # built now, after every stage registered
    return create_model(
        "Recipe",
        __base__=RecipeBase,
        stages=(dict[str, union], Field(..., description="ordered mapping: stage name → settings with `type:`")),
    )


class RecipeError(ValueError):
    """Every problem in a recipe, one per line, each naming its field and the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid recipe:\n" + "\n".join(f"  - {p}" for p in problems))


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """UTF-8 YAML file → OmegaConf → from_dotlist(overrides) → merge → plain, resolved dict."""
    path = Path(path)
    base = _parse_yaml(path, _read_text(path))
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise RecipeError([f"override {o!r} must look like key.path=value" for o in bad])
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides or []))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        msg = (f"overrides {overrides}: {_one_line(exc)}; quote values YAML cannot read, "
               "e.g. 'stages.calibrate.source.path=\"my data.txt\"'")
        raise RecipeError([msg]) from None
    try:
        merged = OmegaConf.merge(base, dotlist)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:  # `model=[1,2]` over a mapping: TypeError
        raise RecipeError([_merge_problem(base, overrides or [], exc)]) from None
    problems = _resolver_problems(OmegaConf.to_container(merged, resolve=False), "")
    if problems:
        raise RecipeError(problems)
    try:
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as exc:
        raise RecipeError([f"{path}: {_one_line(exc)}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError([f"{path}: a recipe is a YAML mapping with name, model and stages (see recipes/debug.yaml)"])
    return raw


def _merge_problem(base: DictConfig, overrides: list[str], exc: BaseException) -> str:
    """An override whose shape does not fit the recipe (a list over a mapping, a mapping over a number, ...)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        try:
            OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        except (OmegaConfBaseException, TypeError, ValueError):
            old = OmegaConf.select(base, key, default=None, throw_on_missing=False)
            kind = type(OmegaConf.to_container(old) if isinstance(old, (DictConfig, ListConfig)) else old).__name__
            return (f"{key}: the override {item!r} does not fit the recipe, where {key} is a {kind}; give a value of "
                    f"that shape, or set its keys one by one (e.g. {key}.source=...)")
        except Exception:  # noqa: BLE001 (reported below, as the merge's own error)
            break
    return f"overrides {overrides}: {_one_line(exc)}; each override sets one key.path=value of the recipe's shape"


# Resolver calls allowed in recipes (``${name:args}``). None by default: ``oc.env`` would put environment variables
# (tokens, user names) into run names, folder names and model cards; ``oc.decode``/``oc.create`` build values from
# strings. ``oc.select`` only reads another key of this recipe (with a default), like a plain ``${a.b}``, which
# stays allowed: an interpolation of other recipe keys reads nothing outside the recipe.
SAFE_RESOLVERS: frozenset[str] = frozenset({"oc.select"})


def _resolver_problems(node: Any, where: str) -> list[str]:
    """Every ``${resolver:...}`` (nested ones included) outside :data:`SAFE_RESOLVERS`, by field."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _resolver_problems(v, f"{where}.{k}" if where else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _resolver_problems(v, f"{where}.{i}")]
    if not isinstance(node, str) or "${" not in node:
        return []
    try:
        tree = grammar_parser.parse(node)
    except Exception as exc:  # noqa: BLE001 (the grammar's own error types vary)
        return [f"{where}: {node!r} is not a valid interpolation ({_one_line(exc)}); escape a literal as \\${{...}}"]
    names, stack = [], [tree]
    while stack:
        n = stack.pop()
        if isinstance(n, OmegaConfGrammarParser.InterpolationResolverContext):
            names.append(n.resolverName().getText())
        stack.extend(n.getChild(i) for i in range(n.getChildCount()) if hasattr(n.getChild(i), "getChildCount"))
    bad = sorted({n for n in names if n not in SAFE_RESOLVERS})
    if not bad:
        return []
    return [f"{where}: {node!r} calls the resolver {', '.join(map(repr, bad))}; resolvers are off in recipes (they would "
            f"write environment variables and secrets into run names and artifacts); write the value itself, or refer "
            f"to another key of the recipe with ${{key.path}}"]


def _read_text(path: Path) -> str:
    """The recipe file's text; a missing, unreadable, binary or non-UTF-8 file is a RecipeError naming it."""
    where = f"recipe file {str(path)!r}"
    if not path.is_file():
        raise RecipeError([f"{where} not found; give the path to a YAML file such as recipes/debug.yaml"])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError([f"{where} cannot be read ({exc.strerror}); fix its permissions"]) from None
    if _looks_binary(data):
        raise RecipeError([f"{where} is a binary file, not YAML text; give a recipe such as recipes/debug.yaml"])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        msg = (f"{where} is not UTF-8: byte 0x{data[exc.start]:02x} on line {line} cannot be decoded; save it as "
               f"UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path} > fixed.yaml`)")
        raise RecipeError([msg]) from None


def _looks_binary(data: bytes) -> bool:
    """A NUL byte, or more than 1% control bytes other than tab / newline / carriage return, in the first 4 KiB."""
    head = data[:4096]
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 13))
    return b"\x00" in head or control > max(2, len(head) // 100)


def _parse_yaml(path: Path, text: str) -> DictConfig:
    """The recipe text as an OmegaConf mapping; YAML errors name the line, the column and the fix."""
    where = f"recipe file {str(path)!r}"
    shape = "a recipe is a YAML mapping with name, model and stages (copy recipes/debug.yaml to start)"
    if not text.strip():
        raise RecipeError([f"{where} is empty; {shape}"])
    try:
        cfg = OmegaConf.create(text)  # OmegaConf's YAML loader: safe, and refuses duplicate keys
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # OmegaConf reads a lone scalar `x` as {x: None}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or _one_line(exc)
        context = getattr(exc, "context", None)
        detail = f"{what} ({context})" if context else what
        msg = (f"{where} is not valid YAML{at}: {detail}; fix the syntax there (indent with spaces, not tabs; "
               "`key: value` pairs; close every [ and {)")
        raise RecipeError([msg]) from None
    except OmegaConfBaseException as exc:
        raise RecipeError([f"{where}: {_one_line(exc)}"]) from None
    if not isinstance(cfg, DictConfig) or not isinstance(root, yaml.MappingNode):
        kind = "list" if isinstance(root, yaml.SequenceNode) else "single value"
        raise RecipeError([f"{where} holds a YAML {kind}, not a mapping; {shape}"])
    return cfg


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def validate(raw: dict[str, Any]) -> RecipeBase:
    """Validate a plain dict, turning pydantic's errors into messages that name the field and the fix."""
    model_cls = recipe_model()
    try:
        return model_cls.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError([_explain(err, raw) for err in exc.errors()]) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RecipeBase:
    return validate(load_raw(path, overrides))


# ----------------------------------------------------------------------------- error messages
def _walk(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], type[BaseModel] | None]:
    """Follow an error's path through the recipe's types: (the path without the tags pydantic inserts
    for unions, the model class that owns its last step). ``stages.prune.prune.ratio`` →
    ``stages.prune.ratio`` (a stage's type); ``stages.calibrate.source.text.pth`` →
    ``stages.calibrate.source.pth`` (a source's kind); owner of ``pth``: TextSource."""
    ann, meta = _unwrap(recipe_model(), ())
    out: list[Any] = []
    owner: type[BaseModel] | None = None
    for key in loc:
        if _is_union(ann):
            members = _union_members(ann, meta)
            if isinstance(key, str) and key in members:
                ann, meta = _unwrap(members[key], ())
                continue
            models = [m for m in members.values() if _is_model(_unwrap(m, ())[0])]
            ann, meta = _unwrap(models[0], ()) if models else (None, ())
        out.append(key)
        if _is_model(ann):
            owner = ann
            field = ann.model_fields.get(key) if isinstance(key, str) else None
            ann, meta = _unwrap(field.annotation, tuple(field.metadata)) if field is not None else (None, ())
        elif typing.get_origin(ann) is dict:
            ann, meta = _unwrap(typing.get_args(ann)[1], ())
        elif typing.get_origin(ann) in (list, tuple) and typing.get_args(ann):
            ann, meta = _unwrap(typing.get_args(ann)[0], ())
        else:
            ann, meta = None, ()
    return tuple(out), owner


def _unwrap(ann: Any, meta: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
    """Strip ``Annotated[...]`` layers, collecting their metadata (Tag, Discriminator, FieldInfo)."""
    while typing.get_origin(ann) is typing.Annotated:
        meta = (*meta, *ann.__metadata__)
        ann = typing.get_args(ann)[0]
    return ann, meta


def _is_union(ann: Any) -> bool:
    return typing.get_origin(ann) in (Union, types.UnionType)


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _union_members(ann: Any, meta: tuple[Any, ...]) -> dict[str, Any]:
    """A union's members by every name pydantic may put in an error path: their ``Tag``, the value of
    a string discriminator field (``type: prune``), and — for plain unions — the class name."""
    field = next((m.discriminator for m in meta if isinstance(getattr(m, "discriminator", None), str)), None)
    members: dict[str, Any] = {}
    for member in typing.get_args(ann):
        inner, inner_meta = _unwrap(member, ())
        names = [m.tag for m in inner_meta if isinstance(m, Tag)]
        if field is not None:
            names += _literal_values(inner, field)
        if _is_model(inner):
            names.append(inner.__name__)
        for name in names:
            members.setdefault(str(name), member)
    return members


def _literal_values(ann: Any, field: str) -> list[Any]:
    """The values a model's ``Literal`` field can take (a union's members' values, for a nested union)."""
    ann, _ = _unwrap(ann, ())
    if _is_union(ann):
        return [v for member in typing.get_args(ann) for v in _literal_values(member, field)]
    if _is_model(ann) and field in ann.model_fields:
        return list(typing.get_args(ann.model_fields[field].annotation))
    return []


def _explain(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc, owner = _walk(tuple(err["loc"]))
    where = ".".join(str(p) for p in loc) or "recipe"
    kind = err["type"]
    is_stage = len(loc) == 2 and loc[0] == "stages"
    if kind == "extra_forbidden":
        allowed = sorted(owner.model_fields) if owner is not None else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where}: unknown key; {hint}allowed keys here: {', '.join(allowed)}"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tag, field = ctx.get("tag"), str(ctx.get("discriminator", "type")).strip("'")
        choices = listed_stage_types() if is_stage else re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
        close = difflib.get_close_matches(str(tag), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = "stage type" if is_stage else "value"
        return f"{where}.{field}: unknown {what} {tag!r}{hint}; choose one of {', '.join(choices)}"
    if kind == "union_tag_not_found" and is_stage:
        return f"{where}: every stage needs `type:`, one of {', '.join(listed_stage_types())}"
    if kind == "missing":
        return f"{where}: required field is missing; add it to the recipe or pass {where}=... on the command line"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return msg if not loc else f"{where}: {msg}"
    return f"{where}: {msg} (got {err.get('input')!r})"
