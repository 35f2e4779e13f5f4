"""Worker errors.

    WorkerError
    ├── EngineError       the engine failed a request (recoverable: the worker keeps serving)
    ├── EngineDead        the engine is gone (unrecoverable: the worker exits)
    ├── ExportFull        no room to hold another prefill's KV (push back: task rejected)
    └── Overloaded        the worker's bounded queue is full (push back: task rejected)
"""

from __future__ import annotations


class WorkerError(Exception):
    code = "engine"


class EngineError(WorkerError):
    code = "engine"


class EngineDead(WorkerError):
    code = "engine_dead"


class ExportFull(WorkerError):
    code = "overloaded"


class Overloaded(WorkerError):
    code = "overloaded"
