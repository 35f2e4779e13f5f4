"""Wire contract of kvrelay: every bus message as a typed, versioned msgpack struct.

Imports nothing else of kvrelay, so any component (or another language's client, through
the README's message tables) can rely on it alone.
"""

from kvrelay.schemas.codec import Message, unpack, unpack_any, pack
from kvrelay.schemas.errors import (
    DecodeError,
    OversizeError,
    SchemaError,
    UnknownTypeError,
    ValidationError,
    VersionError,
)
from kvrelay.schemas.messages import (
    Cancel,
    ChatMessage,
    ClientRequest,
    DispatchReply,
    ErrorInfo,
    KVDescriptor,
    KVLayout,
    LeaseRelease,
    PrefillDone,
    PrefillTask,
    SamplingSpec,
    TokenChunk,
    Usage,
    WorkerInfo,
)
from kvrelay.schemas.struct import Struct, check_fields, limit, typed

__all__ = [
    "Cancel", "ChatMessage", "ClientRequest", "DecodeError", "DispatchReply", "ErrorInfo",
    "KVDescriptor", "KVLayout", "LeaseRelease", "Message", "OversizeError", "PrefillDone",
    "PrefillTask", "SamplingSpec", "SchemaError", "Struct", "TokenChunk", "UnknownTypeError",
    "Usage", "ValidationError", "VersionError", "WorkerInfo", "check_fields", "unpack",
    "unpack_any", "pack", "limit", "typed",
]
