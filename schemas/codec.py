"""The envelope every bus message travels in: msgpack ``{"t": type, "v": version, "b": body}``.

``pack`` turns a ``Message`` into bytes; ``unpack`` turns bytes back into the expected
message type, or raises a ``SchemaError`` subclass saying exactly what was wrong; ``raw_body``
reads the unvalidated body of an envelope that failed (to answer its sender). Envelopes are
parsed here and nowhere else. Nothing here ever unpickles or evaluates anything: msgpack maps,
arrays and scalars only.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import msgspec

from kvrelay.schemas.errors import DecodeError, OversizeError, SchemaError, UnknownTypeError, VersionError
from kvrelay.schemas.struct import Struct, decoder, to_validation_error, typed

M = TypeVar("M", bound="Message")

DEFAULT_MAX_BYTES = 1 << 20
_REGISTRY: dict[str, type[Message]] = {}


class Message(Struct):
    """A versioned bus message. Subclasses set TYPE, VERSION and optionally MAX_BYTES."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    MAX_BYTES: ClassVar[int] = DEFAULT_MAX_BYTES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            prior = _REGISTRY.get(cls.TYPE)
            if prior is not None and prior.__qualname__ != cls.__qualname__:
                raise TypeError(f"message type {cls.TYPE!r} registered by {prior.__qualname__} already")
            _REGISTRY[cls.TYPE] = cls


_ENCODER = msgspec.msgpack.Encoder()


class _Envelope(msgspec.Struct):
    """The envelope read first; the body stays raw msgpack until its type and version are known."""

    t: Any
    v: Any
    b: msgspec.Raw


_ENVELOPE = msgspec.msgpack.Decoder(_Envelope)


def pack(msg: Message) -> bytes:
    data = _ENCODER.encode({"t": msg.TYPE, "v": msg.VERSION, "b": msg})
    if len(data) > msg.MAX_BYTES:
        raise OversizeError(len(data), msg.MAX_BYTES, msg.TYPE)
    return data


def _unpack(data: bytes, limit: int) -> _Envelope:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise OversizeError(len(data), limit)
    try:
        return _ENVELOPE.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"not a kvrelay envelope: expected a map with keys t, v, b ({exc})") from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not a msgpack message: {exc}") from exc


def unpack_any(data: bytes, limit: int = DEFAULT_MAX_BYTES) -> Message:
    """Decode an envelope of any registered type."""
    env = _unpack(data, max(limit, DEFAULT_MAX_BYTES))
    cls = _REGISTRY.get(env.t) if isinstance(env.t, str) else None
    if cls is None:
        raise UnknownTypeError(f"unknown message type {env.t!r}")
    return _body(cls, env, len(data))


def raw_body(data: bytes, limit: int | None = None) -> dict | None:
    """The body map of an envelope, as sent: no type, version or field is checked (a message that
    failed ``unpack`` may still say where to send the error). None when ``data`` is no envelope,
    its body no map, or it is larger than ``limit`` (no limit by default)."""
    if limit is None:
        limit = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0
    try:
        env = _unpack(data, limit)
        body = msgspec.msgpack.decode(env.b)
    except (SchemaError, msgspec.DecodeError):
        return None
    return body if isinstance(body, dict) else None


def unpack(data: bytes, expected: type[M]) -> M:
    """Decode an envelope that must hold ``expected``."""
    env = _unpack(data, expected.MAX_BYTES)
    if env.t != expected.TYPE:
        raise UnknownTypeError(f"expected a {expected.TYPE} message, got {env.t!r}")
    return _body(expected, env, len(data))


def _body(cls: type[M], env: _Envelope, size: int) -> M:
    if size > cls.MAX_BYTES:
        raise OversizeError(size, cls.MAX_BYTES, cls.TYPE)
    if type(env.v) is not int or env.v != cls.VERSION:
        raise VersionError(cls.TYPE, env.v, cls.VERSION)
    try:
        return decoder(cls).decode(env.b)
    except msgspec.ValidationError as exc:
        raise to_validation_error(exc, cls.TYPE) from None


def message(cls: type[M]) -> type[M]:
    """Class decorator kept for call sites: a ``Message`` subclass registers itself by its TYPE."""
    return typed(cls)  # type: ignore[return-value]
