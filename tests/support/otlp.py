"""The tests' OTLP/HTTP receiver is the benchmarks' one (benchmarks/otlp_receiver.py)."""

from benchmarks.otlp_receiver import (  # noqa: F401
    SPAN_KIND_SERVER,
    STATUS_ERROR,
    OtlpReceiver,
    ReceivedSpan,
    tracing_env,
)
