"""The bottom layer: what every kvrelay package may import, and which imports nothing of kvrelay.

- ``logs``   structured logging (structlog) with request ids bound through contextvars
- ``envs``   every environment variable kvrelay reads, typed, with its default
- ``ids``    component and request ids, wall-clock milliseconds and deadlines
- ``tasks``  background-task ownership and the one workaround for a swallowed cancellation

The block-hash contract (block size, hash seed, tenant salt) is part of the wire and lives in
``kvrelay.schemas.hashing``; ``schemas`` and ``kernels`` are bottom-layer packages too.
"""
