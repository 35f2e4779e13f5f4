"""Transport errors. Foreign errors (nats-py, OS, sockets) are translated into these at the boundary.

    TransportError
    ├── BusUnavailable         cannot reach NATS / JetStream (connect failed, no responders)
    ├── BusTimeout             a bus operation did not answer within its timeout
    ├── Backpressure           a bounded stream or queue is full: push back to the client
    │   └── RegionFull         the KV export region has no free blocks (prefill pushes back)
    └── KVTransferError        fetching KV blocks from a peer failed (request falls back)
        ├── PeerGone           the exporting worker or its memory region is gone
        ├── LeaseExpired       the blocks were released or reused before the read finished
        ├── LayoutMismatch     the two sides disagree on the KV layout
        ├── ChecksumMismatch   the bytes read are not the bytes exported
        └── TransferTimeout    the read did not finish within its timeout
"""

from __future__ import annotations


class TransportError(Exception):
    code = "transport"


class BusUnavailable(TransportError):
    code = "unavailable"


class BusTimeout(TransportError):
    code = "timeout"


class Backpressure(TransportError):
    """A bounded queue or stream is full. Callers answer HTTP 429 / an 'overloaded' error reply."""

    code = "overloaded"


class RegionFull(Backpressure):
    """The KV export region has too few free blocks for another prefill's KV."""


class KVTransferError(TransportError):
    code = "transfer"


class PeerGone(KVTransferError):
    code = "peer_gone"


class LeaseExpired(KVTransferError):
    code = "lease_expired"


class LayoutMismatch(KVTransferError):
    code = "layout_mismatch"


class ChecksumMismatch(KVTransferError):
    code = "checksum_mismatch"


class TransferTimeout(KVTransferError):
    code = "transfer_timeout"
