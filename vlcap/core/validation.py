"""Typed values from untrusted mappings: the one validator of every config section and plugin option.

``build(cls, data, where)`` makes dataclass ``cls`` from a nested dict (a ``--config`` file,
``--set``, a run's ``config.yaml``, a checkpoint's metadata, a plugin's options), checking each
value against its field's annotation with pydantic in strict mode: an ``int`` field takes an
integer (not ``True``, ``"5"`` or ``2.0``), a ``float`` field a finite number, a ``str`` field
text, ``Literal[...]`` one of its values. Ranges are ``typing.Annotated`` metadata pydantic
understands (``annotated_types.Ge(1)``, ``Gt(0)``, ``Interval(gt=0, le=1)``; a
``pydantic.Field(description=...)`` also names what is allowed in messages). Every integer must
fit in 64 bits. Nested dataclass fields are built recursively, so a new config section (or a
plugin's ``config_class``) is validated from its annotations with no change here.

A refused value is one ``VlcapError`` line: ``train.batch_size = 0: expected an integer >= 1``.
"""
import dataclasses
import difflib
import functools
import os
import typing
from typing import Annotated, Literal, Union

import annotated_types
from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from vlcap.core.errors import VlcapError

STRICT = ConfigDict(strict=True, allow_inf_nan=False)
INT64 = 2 ** 63
SHOWN_VALUE_CHARS = 60


def build(cls, data, where=""):
    """Dataclass ``cls`` from the mapping ``data``: unknown keys, missing required keys and values
    of the wrong type or range are one ``VlcapError`` naming the dotted key, the value and what
    is allowed, after ``where`` (the file or option the data came from) if given."""
    try:
        return build_at(cls, data, "")
    except VlcapError as exc:
        if not where:
            raise
        raise VlcapError(f"{where}: {exc}") from None


def dotted(path, name):
    return f"{path}.{name}" if path else str(name)


def build_at(cls, data, where):
    """``build`` for the value at dotted key ``where`` ("" at the top)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise VlcapError(f"{where or 'the config'} = {shown(data)}: expected {describe(cls)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        label = key if isinstance(key, str) and len(key) <= SHOWN_VALUE_CHARS else shown(key)
        raise VlcapError(f"unknown key {dotted(where, label)}; {hint}known: {', '.join(fields) or 'none'}")
    missing = [name for name, f in fields.items() if name not in data and not has_default(f)]
    if missing:
        name = missing[0]
        raise VlcapError(f"missing required key {dotted(where, name)} ({describe(hints(cls)[name])})")
    types = hints(cls)
    values = {name: check(types[name], value, dotted(where, name)) for name, value in data.items()}
    try:
        return cls(**values)
    except (VlcapError, ValueError) as exc:  # a class's own checks across its fields (__post_init__)
        raise VlcapError(f"{where}: {exc}" if where else str(exc)) from None


def check(annotation, value, key):
    """``value`` checked against ``annotation`` (nested dataclasses built by ``build``)."""
    target = dataclass_in(annotation)
    if target is not None and (isinstance(value, dict) or isinstance(value, target) or annotation is target):
        return build_at(target, value, key)
    value = plain(value)
    validator = adapter(annotation)
    if validator is None:  # a type pydantic cannot check: the plugin's own checks apply
        return value
    try:
        result = validator.validate_python(value)
    except ValidationError:
        raise VlcapError(f"{key} = {shown(value)}: expected {describe(annotation)}") from None
    except PydanticUserError:  # an annotation naming a type that does not resolve: not checkable
        return value
    except RecursionError:
        raise VlcapError(f"{key}: nested too deeply") from None
    if too_big(result):
        raise VlcapError(f"{key} = {shown(value)}: integers must lie within +-2**63")
    return result


def plain(value):
    """What code (not files) may pass for a value: paths as text, tuples as lists."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return value


def too_big(value, depth=0):
    if isinstance(value, bool) or depth > 50:
        return False
    if isinstance(value, int):
        return not -INT64 <= value < INT64
    if isinstance(value, (list, tuple)):
        return any(too_big(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(too_big(v, depth + 1) for v in value.values())
    return False


def adapter(annotation):
    """pydantic's strict validator of ``annotation``, or None for a type it cannot check (a
    plugin's own class)."""
    try:
        return cached_adapter(annotation)
    except TypeError:  # an unhashable annotation
        return make_adapter(annotation)


@functools.lru_cache(maxsize=None)
def cached_adapter(annotation):
    return make_adapter(annotation)


def make_adapter(annotation):
    try:
        return TypeAdapter(annotation, config=STRICT)
    except PydanticUserError:  # includes PydanticSchemaGenerationError
        return None


@functools.lru_cache(maxsize=None)
def hints(cls):
    """``cls``'s field annotations with their ``Annotated`` metadata (string annotations resolved
    where they can be; as written otherwise)."""
    try:
        return typing.get_type_hints(cls, include_extras=True)
    except Exception:  # a forward reference that does not resolve
        return {f.name: f.type for f in dataclasses.fields(cls)}


def has_default(f):
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def dataclass_in(annotation):
    """The dataclass an annotation stands for (``Optional[Section]`` included), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) is Union:
        found = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def shown(value):
    """A value as a message shows it: its repr, cut short (file contents can be anything)."""
    try:
        text = repr(value)
    except Exception:  # a repr that raises (or a recursive structure) must not hide the error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS] + "..."


BASIC = {int: "an integer", float: "a finite number", bool: "true or false", str: "text", list: "a list",
         dict: "a mapping", type(None): "null"}
BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def describe(annotation):
    """What a value of ``annotation`` may be, in words: ``an integer >= 1``, ``one of 'auto', 'off'``."""
    if dataclasses.is_dataclass(annotation):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(annotation))}"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return describe_annotated(args[0], annotation.__metadata__)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union:
        return " or ".join(describe(a) for a in args)
    if origin in (list, dict):
        inner = ", ".join(describe(a) for a in args)
        return BASIC[origin] + (f" of {inner}" if inner else "")
    return BASIC.get(annotation, getattr(annotation, "__name__", str(annotation)))


def describe_annotated(base, metadata):
    for item in metadata:
        if isinstance(item, FieldInfo) and item.description:
            return item.description
    bounds = bounds_of(metadata)
    return describe(base) + (" " + " and ".join(bounds) if bounds else "")


def bounds_of(metadata):
    """``[">= 1", "<= 256"]`` from ``Annotated`` metadata (annotated_types or pydantic Field)."""
    constraints = []
    for item in metadata:
        constraints += item.metadata if isinstance(item, FieldInfo) else [item]
    bounds = []
    for constraint in constraints:
        for attribute, sign in BOUNDS:
            bound = getattr(constraint, attribute, None)
            if isinstance(bound, (int, float)):
                bounds.append(f"{sign} {bound:g}" if isinstance(bound, float) else f"{sign} {bound}")
    return bounds


# The ranges config sections and plugin options use (re-exported for plugins by vlcap.api).
Gt, Ge, Lt, Le, Interval = (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le,
                            annotated_types.Interval)
Positive = Annotated[int, Ge(1)]
NonNegative = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
Probability = Annotated[float, Interval(ge=0, le=1)]
