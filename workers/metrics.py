"""Prometheus metrics of the prefill and decode workers, and the HTTP endpoint that serves them.

The metric objects live in prometheus_client's default registry and are created once, when this
module is first imported; several services in one process (the tests, ``kvrelay up`` in one
process) share them. Names follow ``kvrelay_<component>_<thing>_<unit>``.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from kvrelay.base.logs import get_logger

log = get_logger(__name__)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)

# --- prefill ------------------------------------------------------------------------------------
# outcome: accepted, invalid, timeout, draining, overloaded, duplicate (dispatch replies) and
# done, finished, cancelled, expired, engine_error, backpressure, publish_failed (task ends)
PREFILL_REQUESTS = Counter("kvrelay_prefill_requests_total", "Prefill tasks by outcome", ["outcome"])
PREFILL_QUEUE_DEPTH = Gauge("kvrelay_prefill_queue_depth", "Prefill tasks accepted but not started")
PREFILL_QUEUED_TOKENS = Gauge("kvrelay_prefill_queued_tokens", "Prompt tokens of the queued prefill tasks")
PREFILL_RUNNING = Gauge("kvrelay_prefill_running", "Prefill tasks in the engine")
PREFILL_SECONDS = Histogram("kvrelay_prefill_seconds", "Time in the engine's prefill", buckets=_LATENCY)
PREFILL_QUEUE_SECONDS = Histogram("kvrelay_prefill_queue_seconds", "Time a prefill task waited in the queue",
                                  buckets=_LATENCY)
LEASES_RELEASED = Counter("kvrelay_leases_released_total", "KV export leases released by a decode worker")
LEASES_EXPIRED = Counter("kvrelay_leases_expired_total", "KV export leases freed because they expired")
EXPORT_FREE_BLOCKS = Gauge("kvrelay_prefill_export_free_blocks", "Free blocks in the KV export region")

# --- decode -------------------------------------------------------------------------------------
# outcome: stop, length, abort, timeout, engine_error, cancelled, undecodable, duplicate, returned
DECODE_REQUESTS = Counter("kvrelay_decode_requests_total", "Decode requests by outcome", ["outcome"])
DECODE_ACTIVE = Gauge("kvrelay_decode_active", "Requests decoding now")
DECODE_INTER_TOKEN = Histogram("kvrelay_decode_inter_token_seconds", "Time between token chunks of a request",
                               buckets=_ITL)
DECODE_TIME_TO_KV = Histogram("kvrelay_decode_time_to_kv_seconds",
                              "From pulling a PrefillDone to the first decoded token (KV import included)",
                              buckets=_LATENCY)
DECODE_TOKENS = Counter("kvrelay_decode_tokens_total", "Tokens streamed by decode workers")
DECODE_KV_RECOMPUTED = Counter("kvrelay_decode_kv_recomputed_total",
                               "Requests whose KV transfer failed and whose prompt was recomputed")
KV_PINS = Counter("kvrelay_decode_kv_pins_total", "Session KV pins by outcome: pinned, refused, then hit "
                  "(the session's next step came), expired, evicted, replaced", ["outcome"])
KV_BYTES_MOVED = Counter("kvrelay_kv_bytes_moved_total", "KV bytes transferred between workers")
BUS_PUBLISH_ERRORS = Counter("kvrelay_worker_publish_errors_total", "Worker publishes that failed", ["kind"])


class MetricsServer:
    """``GET /metrics`` on ``port`` (0 = off). ``start()`` / ``stop()``; owned by a worker service."""

    def __init__(self, port: int, host: str = "0.0.0.0") -> None:
        self.port = port
        self.host = host
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        if not self.port:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metrics_listening", port=self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @staticmethod
    async def _metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
