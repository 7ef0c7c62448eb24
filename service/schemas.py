"""Response bodies of the HTTP API (they also document it under /docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelInfo(BaseModel):
    name: str
    version: str


class PredictionOut(BaseModel):
    index: int
    label: str
    score: float = Field(description="softmax probability")


class CamOut(BaseModel):
    class_index: int
    label: str
    grid: list[list[float]] = Field(description="the raw map on the cell's token grid (h x w), ReLU'd, min-max 0..1")
    width: int = Field(
        description="width of both pictures: the original image's, scaled down with the height to fit "
        "VITAE_CAM_MAX_SIDE (256 by default) on the longer side; scale them up to the photo on the client"
    )
    height: int = Field(description="height of both pictures: the original image's, scaled down like the width")
    heatmap_png: str = Field(description="base64 PNG (palette), the jet colour-mapped heatmap at width x height")
    overlay_jpeg: str = Field(description="base64 JPEG, the heatmap blended half and half over the image")


class TimingOut(BaseModel):
    queue: float = Field(description="ms waiting for a batch")
    inference: float = Field(description="ms of the batch's backend call (and the CAM's, when asked)")
    total: float = Field(description="ms from the request's arrival to this answer")


class ClassifyResult(BaseModel):
    model: ModelInfo
    predictions: list[PredictionOut]
    cam: CamOut | None = Field(None, description="only when cam=true")
    timing_ms: TimingOut


class ErrorBody(BaseModel):
    """The body of every error answer, from the HTTP layer (400, 408, 414, 431) to the app's."""

    detail: str | list[dict] = Field(
        description="what was wrong and what is accepted; a list of field errors for malformed query parameters"
    )


class ErrorOut(BaseModel):
    status: int
    detail: str


class ItemError(BaseModel):
    error: ErrorOut = Field(description="this image alone failed (bad or too large image); the others are answered")


class BatchResult(BaseModel):
    results: list[ClassifyResult | ItemError] = Field(description="one entry per file part, in the order sent")


EXAMPLE_RESULT = {
    "model": {"name": "vitae_fmnist", "version": "1"},
    "predictions": [
        {"index": 9, "label": "Ankle boot", "score": 0.962},
        {"index": 7, "label": "Sneaker", "score": 0.031},
    ],
    "cam": {
        "class_index": 9,
        "label": "Ankle boot",
        "grid": [[0.0, 0.12, 0.4, 0.1], [0.05, 0.6, 1.0, 0.3], [0.1, 0.7, 0.9, 0.2], [0.0, 0.1, 0.2, 0.0]],
        "width": 28,
        "height": 28,
        "heatmap_png": "iVBORw0KGgo...",
        "overlay_jpeg": "/9j/4AAQSkZJRg...",
    },
    "timing_ms": {"queue": 2.1, "inference": 3.4, "total": 7.9},
}
