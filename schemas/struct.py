"""Typed structs: frozen dataclasses whose fields are checked against their annotations.

The same machinery validates wire messages (``schemas.messages``) and component configs
(``from_mapping`` rejects unknown keys). Supported annotations: ``int``, ``float``, ``str``,
``bool``, ``bytes``, ``None``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``,
``Literal[...]`` and nested ``Struct`` subclasses. Checks are compiled once per class.

Field-level limits come from ``field(metadata=...)``: ``min``/``max`` for numbers, ``max_len``
for strings, bytes and sequences.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Union

from kvrelay.schemas.errors import ValidationError

Checker = Callable[[Any, str], Any]


def _fail(path: str, problem: str) -> typing.NoReturn:
    raise ValidationError(path, problem)


def _scalar(kind: type) -> Checker:
    def check(value: Any, path: str) -> Any:
        # bool is an int subclass: never accept it where a number is expected, or the reverse
        if kind is bool:
            if type(value) is not bool:
                _fail(path, f"expected bool, got {type(value).__name__}")
            return value
        if kind is float and type(value) is int:
            return float(value)
        if type(value) is bool or not isinstance(value, kind):
            _fail(path, f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return check


def _seq(inner: Checker, as_tuple: bool) -> Checker:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {type(value).__name__}")
        out = [inner(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if as_tuple else out

    return check


def _fast_int_list(value: Any, path: str) -> Any:
    # token-id lists are the bulk of most messages: check them in one pass
    if not isinstance(value, (list, tuple)):
        _fail(path, f"expected a list, got {type(value).__name__}")
    for i, v in enumerate(value):
        if type(v) is not int:
            _fail(f"{path}[{i}]", f"expected int, got {type(v).__name__}")
    return list(value)


def _mapping(inner: Checker) -> Checker:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, Mapping):
            _fail(path, f"expected a map, got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                _fail(path, f"keys must be strings, got {type(k).__name__}")
            out[k] = inner(v, f"{path}.{k}")
        return out

    return check


def _literal(options: tuple[Any, ...]) -> Checker:
    def check(value: Any, path: str) -> Any:
        if value not in options or type(value) is bool:
            _fail(path, f"expected one of {list(options)!r}, got {value!r}")
        return value

    return check


def _optional(inner: Checker) -> Checker:
    def check(value: Any, path: str) -> Any:
        return None if value is None else inner(value, path)

    return check


def _nested(cls: type[Struct]) -> Checker:
    def check(value: Any, path: str) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            _fail(path, f"expected a {cls.__name__} map, got {type(value).__name__}")
        return cls.from_mapping(value, path=path)

    return check


def _compile(tp: Any) -> Checker:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return lambda v, p: v
    if tp is type(None) or tp is None:
        return lambda v, p: v if v is None else _fail(p, "expected nil")
    if isinstance(tp, type) and issubclass(tp, Struct):
        return _nested(tp)
    if tp in (int, float, str, bool, bytes):
        return _scalar(tp)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"only X | None unions are supported, got {tp!r}")
        return _optional(_compile(rest[0]))
    if origin is list:
        return _fast_int_list if args == (int,) else _seq(_compile(args[0]), as_tuple=False)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _seq(_compile(args[0]), as_tuple=True)
    if origin is dict and args[0] is str:
        return _mapping(_compile(args[1]))
    if origin is Literal:
        return _literal(args)
    raise TypeError(f"unsupported field annotation {tp!r}")


def _limits(f: dataclasses.Field, inner: Checker) -> Checker:
    lo, hi, max_len = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("max_len")
    if lo is None and hi is None and max_len is None:
        return inner

    def check(value: Any, path: str) -> Any:
        value = inner(value, path)
        if value is None:
            return value
        if max_len is not None and len(value) > max_len:
            _fail(path, f"length {len(value)} is over the limit of {max_len}")
        if lo is not None and value < lo:
            _fail(path, f"{value!r} is below the minimum {lo!r}")
        if hi is not None and value > hi:
            _fail(path, f"{value!r} is above the maximum {hi!r}")
        return value

    return check


def limit(default: Any = dataclasses.MISSING, **meta: Any) -> Any:
    """A dataclass field with validation limits: ``limit(0, min=0, max=10)``, ``limit(max_len=64)``."""
    if isinstance(default, (list, dict)):
        factory = type(default)
        return dataclasses.field(default_factory=lambda: factory(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Struct:
    """Base of typed structs. Subclasses are ``@dataclasses.dataclass(frozen=True)``."""

    _checkers: ClassVar[dict[str, Checker] | None] = None

    @classmethod
    def _compiled(cls) -> dict[str, Checker]:
        checkers = cls.__dict__.get("_checkers")
        if checkers is None:
            hints = typing.get_type_hints(cls)
            checkers = {f.name: _limits(f, _compile(hints[f.name])) for f in dataclasses.fields(cls)}
            cls._checkers = checkers
        return checkers

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], path: str | None = None) -> Any:
        """Build and validate from a plain mapping; unknown keys and missing fields are errors."""
        path = path or cls.__name__
        if not isinstance(data, Mapping):
            _fail(path, f"expected a map, got {type(data).__name__}")
        checkers = cls._compiled()
        unknown = [k for k in data if k not in checkers]
        if unknown:
            _fail(path, f"unknown field(s) {sorted(map(str, unknown))}; known: {sorted(checkers)}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                values[f.name] = checkers[f.name](data[f.name], f"{path}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                _fail(f"{path}.{f.name}", "missing required field")
        obj = cls(**values)
        obj.validate()
        return obj

    def validate(self) -> None:
        """Cross-field checks; override and raise ValidationError."""

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            out[f.name] = _plain(getattr(self, f.name))
        return out

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _plain(value: Any) -> Any:
    if isinstance(value, Struct):
        return value.to_mapping()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def typed(cls: type) -> type:
    """Class decorator for structs and configs: a frozen, keyword-only dataclass."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def check_fields(obj: Struct) -> None:
    """Validate an object built in code (not decoded) against its own annotations and limits."""
    checkers = type(obj)._compiled()
    name = type(obj).__name__
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        checkers[f.name](getattr(obj, f.name), f"{name}.{f.name}")
    obj.validate()
