"""Prometheus metrics on a registry owned by one app, so that tests can build several apps side by side."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every metric the service exposes, by subject: HTTP, batching, the response cache, models, tracing."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._http(self.registry)
        self._batching(self.registry)
        self._cache(self.registry)
        self._models(self.registry)

    def _http(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "vitae_requests",
            "HTTP requests by route, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vitae_request_latency_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.spans_dropped = Counter(
            "vitae_trace_spans_dropped",
            "Trace spans that never reached the collector, by reason: queue_full or export_failed",
            ["reason"],
            registry=r,
        )

    def _batching(self, r: CollectorRegistry) -> None:
        self.queue_wait = Histogram(
            "vitae_queue_wait_seconds",
            "Time an image waited in the batch queue",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vitae_batch_size", "Images per batch sent to the backend", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "vitae_inference_seconds", "Backend time per batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_thread_cpu = Counter(
            "vitae_inference_thread_cpu_seconds",
            "CPU time the batch workers' threads spent inside backend calls: the inference runtime's own work on the "
            "calling thread (its other threads are not counted)",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge("vitae_queue_depth", "Images waiting for a batch", ["model"], registry=r)
        self.dropped = Counter(
            "vitae_dropped_images", "Queued images never computed, by reason", ["model", "reason"], registry=r
        )
        self.batch_failures = Counter(
            "vitae_batch_failures", "Batches whose backend call raised", ["model"], registry=r
        )
        self.nonfinite = Counter(
            "vitae_nonfinite_images",
            "Images whose backend outputs held NaN or infinity, by outcome: recomputed_fp32 or refused (a 500)",
            ["outcome"],
            registry=r,
        )

    def _cache(self, r: CollectorRegistry) -> None:
        self.cache_hits = Counter(
            "vitae_cache_hits", "Requests answered from the response cache or by an identical one in flight", registry=r
        )
        self.cache_misses = Counter("vitae_cache_misses", "Requests the response cache computed", registry=r)
        self.cache_evictions = Counter(
            "vitae_cache_evictions", "Answers evicted from the response cache to fit VITAE_CACHE_MB", registry=r
        )
        self.cache_bytes = Gauge("vitae_cache_bytes", "Bytes the response cache holds", registry=r)
        self.cache_entries = Gauge("vitae_cache_entries", "Answers the response cache holds", registry=r)

    def _models(self, r: CollectorRegistry) -> None:
        self.model_loads = Counter(
            "vitae_model_loads",
            "Model versions loaded, by model and outcome: live (serving) or refused (failed to load or its checks)",
            ["model", "outcome"],
            registry=r,
        )
        self.backend = Gauge("vitae_backend_info", "The backend in use (value 1)", ["backend", "device"], registry=r)
        self.ready = Gauge("vitae_ready", "1 once the model is loaded and warmed up", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
