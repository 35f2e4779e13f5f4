"""Typed structs: ``msgspec.Struct`` classes, frozen, keyword-only, rejecting unknown keys.

The same classes validate wire messages (``schemas.codec`` decodes bodies with one
``msgspec.msgpack.Decoder`` per type) and component configs (``from_mapping`` is a strict
``msgspec.convert``: no bool for an int, no string for a number). msgspec does the type and
limit checks in C; this module only keeps the project's names:

- ``limit(default, min=, max=, max_len=)`` on a field becomes ``Annotated[T, Meta(ge=, le=,
  max_length=)]`` when the class is made (for ``T | None`` the limit applies to ``T``);
- ``validate()``, the cross-field checks, runs as msgspec's ``__post_init__``: on decode, on
  ``from_mapping`` and on construction in code;
- msgspec's errors become ``ValidationError`` with a path rooted at the message type or the
  config (``PrefillTask.sampling.top_p``, ``config.router.max_inflight``).
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Union

import msgspec

from kvrelay.schemas.errors import ValidationError

_AT = re.compile(r"^(.*) - at `(?:key` in `)?\$([^`]*)`$", re.S)
_DECODERS: dict[type, msgspec.msgpack.Decoder] = {}
_NO_DEFAULT = msgspec.NODEFAULT


class _Limit:
    __slots__ = ("default", "meta")

    def __init__(self, default: Any, meta: msgspec.Meta) -> None:
        self.default, self.meta = default, meta


def limit(default: Any = _NO_DEFAULT, *, min: Any = None, max: Any = None, max_len: int | None = None) -> Any:
    """A field default with validation limits: ``limit(0, min=0, max=10)``, ``limit(max_len=64)``."""
    return _Limit(default, msgspec.Meta(ge=min, le=max, max_length=max_len))


def _limited(ann: Any, meta: msgspec.Meta, module: str, ns: dict[str, Any]) -> Any:
    tp = eval(ann, vars(sys.modules[module]), ns) if isinstance(ann, str) else ann  # noqa: S307 (own source)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return Union[tuple([Annotated[a, meta] for a in rest] + [type(None)])]  # noqa: UP007
    return Annotated[tp, meta]


def _default(value: Any) -> Any:
    if isinstance(value, (list, dict)) and value:
        return msgspec.field(default_factory=lambda: type(value)(value))
    return value


class _StructMeta(type(msgspec.Struct)):  # type: ignore[misc]
    """Turns ``limit(...)`` defaults into annotated constraints, and ``validate`` into ``__post_init__``."""

    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any], **kw: Any) -> Any:
        anns = dict(ns.get("__annotations__", {}))
        for field, value in list(ns.items()):
            if isinstance(value, _Limit):
                anns[field] = _limited(anns[field], value.meta, ns["__module__"], ns)
                if value.default is _NO_DEFAULT:
                    del ns[field]
                else:
                    ns[field] = _default(value.default)
            elif field in anns and isinstance(value, (list, dict)):
                ns[field] = _default(value)
        ns["__annotations__"] = anns
        if "validate" in ns and "__post_init__" not in ns:
            ns["__post_init__"] = ns["validate"]
        kw.setdefault("kw_only", True)  # msgspec applies it to each class's own fields only
        return super().__new__(mcls, name, bases, ns, **kw)


class Struct(msgspec.Struct, metaclass=_StructMeta, frozen=True, forbid_unknown_fields=True):
    """Base of typed structs and configs."""

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], path: str | None = None) -> Any:
        """Build and validate from a plain mapping; unknown keys and missing fields are errors."""
        try:
            return msgspec.convert(data, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise to_validation_error(exc, path or cls.__name__) from None

    def validate(self) -> None:
        """Cross-field checks; override and raise ValidationError (run as ``__post_init__``)."""

    def to_mapping(self) -> dict[str, Any]:
        return msgspec.to_builtins(self, builtin_types=(bytes,))

    def replace(self, **changes: Any) -> Any:
        return msgspec.structs.replace(self, **changes)


def to_validation_error(exc: msgspec.ValidationError, root: str) -> ValidationError:
    """msgspec's "problem - at `$.a.b`" as ``ValidationError("<root>.a.b", problem)``; a cross-field
    check's own error (raised in ``validate``) comes back as it was raised."""
    if isinstance(exc.__cause__, ValidationError):
        return exc.__cause__
    m = _AT.match(str(exc))
    if m is None:
        return ValidationError(root, str(exc))
    return ValidationError(root + m.group(2), m.group(1))


def decoder(cls: type) -> msgspec.msgpack.Decoder:
    """The msgpack decoder of one struct type (made once)."""
    dec = _DECODERS.get(cls)
    if dec is None:
        dec = _DECODERS[cls] = msgspec.msgpack.Decoder(cls)
    return dec


def typed(cls: type) -> type:
    """Class decorator kept for call sites: ``Struct`` subclasses are already frozen and keyword-only."""
    return cls


def check_fields(obj: Struct) -> None:
    """Validate an object built in code (not decoded) against its own annotations and limits."""
    name = type(obj).__name__
    for f in msgspec.structs.fields(obj):
        value = getattr(obj, f.name)
        try:
            msgspec.convert(value, f.type, strict=True)
        except msgspec.ValidationError as exc:
            raise to_validation_error(exc, f"{name}.{f.name}") from None
    obj.validate()
