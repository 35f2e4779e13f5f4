"""Errors raised while decoding or validating bus messages and configs.

    SchemaError
    ├── DecodeError        bytes that are not a msgpack envelope
    ├── OversizeError      a message larger than its type allows
    ├── UnknownTypeError   an envelope naming a message type this build does not know
    ├── VersionError       a known type at a version this build cannot read
    └── ValidationError    a field missing, of the wrong type, out of range, or unknown

Every error carries what a log line or an error reply needs to say what was wrong.
"""

from __future__ import annotations


class SchemaError(ValueError):
    """Base of every schema error: the input was bad, nothing else broke."""

    code = "bad_message"


class DecodeError(SchemaError):
    code = "undecodable"


class OversizeError(SchemaError):
    code = "oversize"

    def __init__(self, size: int, limit: int, what: str = "message") -> None:
        super().__init__(f"{what} is {size} bytes, over the limit of {limit}")
        self.size = size
        self.limit = limit


class UnknownTypeError(SchemaError):
    code = "unknown_type"


class VersionError(SchemaError):
    code = "bad_version"

    def __init__(self, type_name: str, got: object, supported: int) -> None:
        super().__init__(f"{type_name}: version {got!r} is not supported (this build reads version {supported})")
        self.got = got
        self.supported = supported


class ValidationError(SchemaError):
    code = "invalid"

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
