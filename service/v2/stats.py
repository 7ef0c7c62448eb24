"""Triton's statistics extension, read from the service's Prometheus samples."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ..artifacts import ServedArtifacts


def model_stats(registry: CollectorRegistry, served: ServedArtifacts, batcher: str = "classify") -> dict:
    """Triton's per-model statistics from its classify batcher's Prometheus samples (all routes together)."""

    def sample(name: str) -> float:
        return registry.get_sample_value(name, {"model": batcher}) or 0.0

    images, batches = sample("vitae_batch_size_sum"), sample("vitae_batch_size_count")
    return {
        "name": served.name,
        "version": served.version,
        "inference_count": int(images),
        "execution_count": int(batches),
        "inference_stats": {
            "queue": {
                "count": int(sample("vitae_queue_wait_seconds_count")),
                "ns": ns(sample("vitae_queue_wait_seconds_sum")),
            },
            "compute_infer": {"count": int(batches), "ns": ns(sample("vitae_inference_seconds_sum"))},
            "fail": {"count": int(sample("vitae_batch_failures_total")), "ns": 0},
        },
    }


def ns(seconds: float) -> int:
    return round(seconds * 1e9)
