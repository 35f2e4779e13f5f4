"""The router's Prometheus metrics, on a registry of its own (served at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class RouterMetrics:
    """``api`` is chat, completions or nats; ``outcome`` is ok or the error code given to the client."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvrelay_router_requests_total", "Requests by API and outcome",
                                ["api", "outcome"], registry=r)
        self.ttft = Histogram("kvrelay_router_ttft_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("kvrelay_router_inter_token_seconds", "Gap between token chunks",
                                     buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("kvrelay_router_e2e_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("kvrelay_router_inflight", "Requests in flight through this router",
                              registry=r)
        self.dispatch_rejections = Counter("kvrelay_router_dispatch_rejections_total",
                                           "Prefill dispatches refused or unanswered, by reason",
                                           ["reason"], registry=r)
        self.admission_waiting = Gauge("kvrelay_router_admission_waiting",
                                       "Requests waiting in the admission queue for a prefill worker with room",
                                       registry=r)
        self.admission_wait = Histogram("kvrelay_router_admission_wait_seconds",
                                        "Time spent in the admission queue (placed, timed out or gone)",
                                        buckets=_LATENCY_BUCKETS, registry=r)
        self.admission_rejections = Counter("kvrelay_router_admission_rejections_total",
                                            "Requests turned away by admission: queue_full, pushed_out (its "
                                            "place given to a tenant below its share), max_inflight, refused "
                                            "(no waiting), deadline, wait_bound (NATS: back to the stream)",
                                            ["reason"], registry=r)
        self.intake_invalid = Counter("kvrelay_router_intake_invalid_total",
                                      "NATS intake messages that were not a valid ClientRequest", registry=r)
        self.intake_requeued = Counter("kvrelay_router_intake_requeued_total",
                                       "NATS intake requests put back in the stream: no worker free yet",
                                       registry=r)
        self.chunks_dropped = Counter("kvrelay_router_chunks_dropped_total",
                                      "Token chunks dropped: duplicate, late, undecodable or unexpected",
                                      ["reason"], registry=r)
        # label "tenant": a configured tenant's name, or "open" without tenants (bounded by the config)
        self.tenant_requests = Counter("kvrelay_router_tenant_requests_total",
                                       "Requests by tenant and outcome (quota rejections included)",
                                       ["tenant", "outcome"], registry=r)
        self.tenant_admission_wait = Histogram("kvrelay_router_tenant_admission_wait_seconds",
                                               "Time spent in the admission queue, by tenant",
                                               ["tenant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tenant_tokens = Counter("kvrelay_router_tenant_tokens_total",
                                     "Tokens admitted by tenant: prompt, and max_tokens asked",
                                     ["tenant", "kind"], registry=r)
        self.streams_lost = Counter("kvrelay_router_streams_lost_total",
                                    "Requests ended by the router because their worker was gone (worker_lost) "
                                    "or their stream stalled (stream_stalled)", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
