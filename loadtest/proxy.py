"""A least-outstanding-requests HTTP proxy in front of OpenAI-compatible servers (the baseline).

    python -m kvrelay.loadtest.proxy --port 8100 \
        --backend http://127.0.0.1:8101 --backend http://127.0.0.1:8102

``POST /v1/*`` goes to the backend with the fewest requests in flight through this proxy (ties
go round robin), and the response streams back as it arrives (SSE passes through untouched).
``GET /v1/models`` asks the first backend; ``GET /health`` is 200 only when every backend's
``/health`` is. It is the "load-based router" of the aggregated deployment in ``bench compare``:
what a plain vLLM fleet gets from a simple balancer, with no KV awareness.

Bounds: at most ``max_inflight`` requests in flight in total (past it: 429 with Retry-After);
every backend call has ``timeout_s``; bodies are limited to ``max_body_bytes``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


@dataclass
class Balancer:
    """Least outstanding requests with round-robin ties; pure (no I/O)."""

    n: int
    outstanding: list[int] = field(default_factory=list)
    _next: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("a balancer needs at least one backend")
        self.outstanding = [0] * self.n

    def acquire(self) -> int:
        low = min(self.outstanding)
        for k in range(self.n):
            i = (self._next + k) % self.n
            if self.outstanding[i] == low:
                self._next = (i + 1) % self.n
                self.outstanding[i] += 1
                return i
        raise AssertionError("unreachable")

    def release(self, i: int) -> None:
        if self.outstanding[i] <= 0:
            raise ValueError(f"backend {i} has no request in flight")
        self.outstanding[i] -= 1


class Proxy:
    def __init__(self, backends: list[str], max_inflight: int = 1024, timeout_s: float = 900.0,
                 max_body_bytes: int = 16 << 20) -> None:
        self.backends = [b.rstrip("/") for b in backends]
        self.balancer = Balancer(len(self.backends))
        self.max_inflight, self.timeout_s, self.max_body_bytes = max_inflight, timeout_s, max_body_bytes
        self.routed = [0] * len(self.backends)
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post("/v1/{tail:.*}", self.forward)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_inflight),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=10))

    async def _close(self, app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the proxy app is not started"
        return self._session

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if sum(self.balancer.outstanding) >= self.max_inflight:
            return web.json_response({"error": {"message": "proxy at capacity", "type": "rate_limit"}},
                                     status=429, headers={"Retry-After": "1"})
        body = await request.read()
        i = self.balancer.acquire()
        self.routed[i] += 1
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
            async with self.session.post(self.backends[i] + request.path, data=body, headers=headers) as up:
                out = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS})
                await out.prepare(request)
                async for piece in up.content.iter_any():
                    await out.write(piece)
                await out.write_eof()
                return out
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            err = {"message": f"backend {i} failed: {exc!r}", "type": "bad_gateway"}
            return web.json_response({"error": err}, status=502)
        finally:
            self.balancer.release(i)

    async def models(self, request: web.Request) -> web.Response:
        try:
            async with self.session.get(self.backends[0] + "/v1/models") as r:
                return web.json_response(await r.json(), status=r.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return web.json_response({"error": {"message": repr(exc)}}, status=502)

    async def health(self, request: web.Request) -> web.Response:
        async def one(b: str) -> bool:
            try:
                async with self.session.get(b + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    return r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False

        ok = await asyncio.gather(*(one(b) for b in self.backends))
        body = {"backends": dict(zip(self.backends, ok)), "outstanding": self.balancer.outstanding,
                "routed": self.routed}
        return web.json_response(body, status=200 if all(ok) else 503)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvrelay.loadtest.proxy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", action="append", required=True, help="backend base URL (repeat)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-inflight", type=int, default=1024)
    ap.add_argument("--timeout-s", type=float, default=900.0)
    args = ap.parse_args(argv)
    proxy = Proxy(args.backend, args.max_inflight, args.timeout_s)
    web.run_app(proxy.app(), host=args.host, port=args.port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
