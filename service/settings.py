"""Service configuration: one pydantic-settings class read from `VITAE_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Backend = Literal["auto", "tensorrt", "openvino", "onnxruntime", "torch"]


class Settings(BaseSettings):
    """Every knob of the service; each field is read from `VITAE_<NAME>` (case-insensitive)."""

    model_config = SettingsConfigDict(env_prefix="VITAE_", case_sensitive=False, extra="ignore")

    artifacts: Path = Field(Path("artifacts"), description="Export output folder to serve (metadata.json, model.onnx).")
    model_repository: Path | None = Field(
        None,
        description="Serve every model in DIR/<name>/<version>/ (each an artifacts folder) instead of `artifacts`, "
        "with new versions put live without a restart (docs/serving/models.md).",
    )
    default_model: str | None = Field(
        None, description="With a model repository: the model a request that names none gets; default: the first name."
    )
    model_poll_s: float = Field(
        2.0, ge=0, description="With a model repository: seconds between looks for new version folders; 0 = never."
    )
    checkpoint: Path = Field(
        Path("demo/model/vitae_fmnist.safetensors"),
        description="Checkpoint exported into `artifacts` at start when the artifacts are missing or stale.",
    )
    auto_export: bool = Field(True, description="Run the export stage at start when artifacts are missing or stale.")
    backend: Backend = Field("auto", description="Inference backend: auto picks the fastest available one.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    cpu_precision: Literal["auto", "bf16", "int8", "fp32"] = Field(
        "auto",
        description="OpenVINO's precision on CPU: auto = the fastest of bf16 and int8 that this CPU computes "
        "natively and the export measured as safe on a CPU of this kind, else fp32; a forced bf16 or int8 is "
        "refused (the service does not start) when it is not so.",
    )
    export_cpu_int8: bool = Field(
        False,
        description="When the service exports at start, also build and measure an OpenVINO int8 model (NNCF with "
        "accuracy control; tens of seconds more) so that auto may serve int8 where it passed and is fastest.",
    )
    gpu_precision: Literal["auto", "fp16", "bf16", "fp32"] = Field(
        "auto",
        description="The torch backend's precision on CUDA: auto = fp16 or bf16, whichever passes the gate against "
        "fp32 at load (finite, every top-1 the same, max logit difference within tolerance on real images) and is "
        "closest to fp32, else fp32 with one log line; fp16 or bf16 = only that one is measured (fp32 when it "
        "fails); fp32 = no half precision. /readyz and /model report the figures.",
    )
    gpu_decode: bool = Field(
        True,
        description="When the torch backend serves on CUDA: decode JPEG uploads on the GPU (torchvision's nvJPEG) "
        "and preprocess them there; other formats, CAM requests and JPEGs nvJPEG refuses take the PIL path.",
    )
    openvino_cache_dir: Path | None = Field(
        None, description="Compiled-model cache of the openvino backend; default: openvino_cache/ in `artifacts`."
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Largest batch the batcher sends to the backend. Left unset, a CPU backend running several "
        "streams takes at most 4 per batch (on CPU, batching gains nothing over single images).",
    )
    max_delay_ms: float = Field(
        5.0,
        ge=0,
        description="Longest time the oldest queued request waits for a batch to fill, in ms, while another batch "
        "is being computed (with none, it goes at once unless VITAE_BATCH_WAIT_WHEN_IDLE is set).",
    )
    urgent_window_s: float = Field(
        2.0,
        ge=0,
        description="For this many seconds after a high-priority request arrives, the CPU batcher computes one batch "
        "at a time, on every core (OpenVINO with several streams only): an urgent image waits for one batch rather "
        "than one per stream and is computed on every core, at the cost of the other requests' throughput while "
        "urgent traffic lasts (ViTAE-T on 2 cores: 11-14 % less). 0 turns it off.",
    )
    batch_wait_when_idle: bool = Field(
        False,
        description="Wait up to the max delay for a batch to fill even when no batch is being computed. Off: a "
        "request that finds the engine idle goes at once with whatever is queued (no wait for company), and "
        "batches fill while the engine is busy. On: more images per batch at low load, at a lone request's "
        "expense (for engines, e.g. a GPU, where one image costs almost as much as a batch).",
    )
    queue_capacity: int = Field(1024, ge=1, description="Queued images beyond which requests get 503 + Retry-After.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline per request; past it the answer is 504.")
    cache_mb: float = Field(
        64.0,
        ge=0,
        description="Response cache size in MiB: answers to repeated uploads (same bytes, model version and "
        "options) are served from memory, least recently used evicted first; 0 turns the cache off. 64 MiB holds "
        "about 60,000 /classify answers without CAM (about 1 KiB each) or some 500 with CAM pictures.",
    )
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Largest request body accepted (else 413).")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image, width x height (else 413).")
    max_files: int = Field(64, ge=1, description="Most images in one request (multipart parts, or a v2 batch).")
    cam_max_side: int = Field(
        256,
        ge=16,
        description="The CAM heatmap PNG and overlay JPEG are drawn at most this many pixels on the longer side "
        "(aspect kept): their cost stays a few ms whatever the upload's size.",
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest request line plus headers, in bytes (else 431 and the connection closes).",
    )
    max_url_bytes: int = Field(
        8 * 1024, ge=256, description="Longest request target (path and query), in bytes (else 414)."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time a connection has to send a request's headers (else 408 and it is closed)."
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="Time a request has to send its whole body once its headers arrived (else 408)."
    )
    drain_grace_s: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM: seconds to keep accepting requests with /readyz 503 (so load balancers take the "
        "pod out) before the port closes and open requests drain.",
    )
    api_key: SecretStr | None = Field(
        None, description="When set, requests need `Authorization: Bearer <key>` or `X-API-Key: <key>`."
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Key of the model control endpoints (/admin/models/...), sent as `X-Admin-Key: <key>`; "
        "unset (default), those endpoints are off.",
    )
    ui: bool = Field(True, description="Serve the web page at / (false: the API alone; /docs stays).")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS; empty (default) disables CORS."
    )
    threads: int = Field(0, ge=0, description="Backend intra-op threads; 0 lets the backend decide (all cores).")
    infer_streams: int = Field(
        0,
        ge=0,
        le=64,
        description="Batches computed at once on CPU (OpenVINO streams, concurrent ONNX Runtime runs), each on its "
        "share of the threads; 0 = the backend's choice (OpenVINO's THROUGHPUT hint; ONNX Runtime: one per core, "
        "up to 4). 1 = one batch at a time on every core (lowest latency for one request). GPU backends run one.",
    )
    preprocess_threads: int = Field(0, ge=0, description="Decode/preprocess thread pool size; 0 = min(4, cores).")
    host: str = Field("0.0.0.0", description="Address uvicorn binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port uvicorn binds.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: readable lines; json: one JSON object a line (timestamp, level, logger, message, "
        "request_id, trace_id, model, status, durations) for log collectors (docs/serving/tracing.md).",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        device = value.lower()
        if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
            return device
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (N the GPU's index, e.g. cuda:0), got {value!r}")

    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


def get_settings(**overrides: object) -> Settings:
    """Read the environment now (never at import); keyword overrides win over the environment."""
    return Settings(**overrides)
