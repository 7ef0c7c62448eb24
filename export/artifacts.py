"""The artifacts contract between the export stage and the service: the folder's file and tensor names, and
`metadata.json` as one typed, versioned, validated record (`ArtifactsMetadata`).

The export stage writes it (`export.pipeline`), the service reads it (`service.artifacts`); nobody else opens
`metadata.json` or spells a key of it. Imports neither torch nor onnx, so that the service's ONNX Runtime path
can read artifacts without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import Preprocessing, ViTAEConfig

# The schema of metadata.json. Bump the number when a key changes meaning or a required key is added;
# artifacts of another format count as stale for the export stage and unreadable for the service.
SCHEMA_VERSION = 1
FORMAT = f"vitae-artifacts/{SCHEMA_VERSION}"
METADATA = "metadata.json"

# File names in an artifacts folder, and the keys of `files` that name them.
ONNX, WEIGHTS, HEAD = "model.onnx", "model.safetensors", "head.safetensors"
PLAN, LAYERS, TIMING_CACHE = "model.plan", "layers.json", "timing.cache"

# The served graph's tensors: normalised images in; logits (B, K) and last-cell tokens (B, N, D) out.
INPUT_NAME = "images"
LOGITS, TOKENS = "logits", "tokens"
OUTPUT_NAMES = (LOGITS, TOKENS)


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class MetadataError(ValueError):
    """metadata.json is missing, unreadable, of another format, or lacks a field; the message says which."""


def _required(d: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise MetadataError(f"{METADATA} lacks the field {key!r}")
    if not isinstance(d[key], kind):
        raise MetadataError(f"{METADATA} field {key!r} has the wrong type ({type(d[key]).__name__})")
    return d[key]


@dataclass(frozen=True)
class ArtifactsMetadata:
    """The contents of an artifacts folder's metadata.json, field by field (JSON values, as written).

    `read` / `from_dict` validate (format, required fields and their types, the preprocessing and model
    config); `write` / `to_dict` give back exactly what was read, unknown fields included.
    """

    name: str
    version: str
    config: dict[str, Any]  # ViTAEConfig.to_dict()
    class_names: list[str]
    preprocessing: dict[str, Any]  # Preprocessing.to_dict()
    grid: list[int]  # [H, W] of the last cell's token grid
    inputs: list[dict[str, Any]]  # [{"name", "dtype", "shape"}], batch dim -1
    outputs: list[dict[str, Any]]
    files: dict[str, str]  # role ("onnx", "weights", "head", "plan", "layers") -> file name
    checksums: dict[str, str]  # file name -> sha256
    settings: dict[str, Any]  # the export options: max_batch, precision, opset
    format: str = FORMAT
    variant: str | None = None
    class_names_source: str | None = None
    wordnet_ids: list[str] | None = None
    checkpoint: dict[str, Any] | None = None  # {"path", "sha256"}
    fingerprint: str | None = None
    parity: dict[str, Any] | None = None
    cpu_bf16: dict[str, Any] | None = None  # OpenVINO bf16 against fp32 on this CPU (export.precision)
    cpu_int8: dict[str, Any] | None = None  # OpenVINO int8 (NNCF) against fp32 on this CPU (export.int8)
    tensorrt: dict[str, Any] | None = None  # what the plan is tied to: version, gpu_name, compute_capability, ...
    versions: dict[str, Any] | None = None
    exported_at: str | None = None
    content_sha256: str | None = None  # the digest metadata.json records of its other fields, as read
    extra: dict[str, Any] = field(default_factory=dict)  # fields this version does not know, kept on rewrite

    # ------------------------------------------------------------ read / validate / write

    @classmethod
    def from_dict(cls, d: Any) -> ArtifactsMetadata:
        """Validate a parsed metadata.json; MetadataError names the first field that is wrong."""
        if not isinstance(d, dict):
            raise MetadataError(f"{METADATA} is not a JSON object")
        if d.get("format") != FORMAT:
            raise MetadataError(f"{METADATA} has format {d.get('format')!r}; this code reads {FORMAT!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "name", "version"}
        kinds = {"config": dict, "class_names": list, "preprocessing": dict, "grid": list, "inputs": list}
        kinds |= {"outputs": list, "files": dict, "checksums": dict, "settings": dict}
        for key, kind in kinds.items():
            _required(d, key, kind)
        for role in ("onnx", "head"):
            if not isinstance(d["files"].get(role), str):
                raise MetadataError(f"{METADATA} names no {role!r} file in 'files'")
        meta = cls(
            **{k: v for k, v in d.items() if k in known},
            name=str(d.get("name") or d.get("variant") or ""),
            version=str(d.get("version") or ""),
            extra={k: v for k, v in d.items() if k not in known | {"name", "version"}},
        )
        try:
            meta.preprocessing_config()
            meta.model_config()
            if len(meta.grid) != 2:
                raise ValueError(f"grid must be [H, W], got {meta.grid}")
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(f"{METADATA} has an invalid model description ({exc!r})") from exc
        return meta

    @classmethod
    def read(cls, folder: str | Path) -> ArtifactsMetadata:
        """metadata.json of an artifacts folder; MetadataError when it is missing, unreadable or invalid."""
        path = Path(folder) / METADATA
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise MetadataError(f"no {METADATA} in {Path(folder).resolve()}") from exc
        except (OSError, ValueError) as exc:
            raise MetadataError(f"cannot read {path} ({exc})") from exc
        return cls.from_dict(data)

    @classmethod
    def read_if_valid(cls, folder: str | Path) -> ArtifactsMetadata | None:
        """Like `read`, but None instead of an error (for "is there a current export here?")."""
        try:
            return cls.read(folder)
        except MetadataError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in the order the export writes them, unknown fields last, then the digest of
        all of them (`content_sha256`, computed now: what metadata.json records of its own content)."""
        return self._content() | {"content_sha256": self.content_digest()}

    def _content(self) -> dict[str, Any]:
        skip = ("extra", "content_sha256")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        order = ("format", "name", "version", "variant", "config", "class_names", "class_names_source")
        return {k: d[k] for k in order} | {k: v for k, v in d.items() if k not in order} | self.extra

    def write(self, folder: Path) -> None:
        """Write metadata.json into `folder` (the export's staging folder), sealed with its content digest."""
        (folder / METADATA).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------ integrity

    def content_digest(self) -> str:
        """sha256 of every field but `content_sha256`, as canonical JSON: what an edit of metadata.json changes."""
        return hashlib.sha256(json.dumps(self._content(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def integrity_problem(self, folder: Path) -> str | None:
        """Why the folder's files are not what the export wrote, or None when every digest matches.

        metadata.json against its own `content_sha256` (artifacts exported before it was recorded pass: there
        is nothing to check against), then every file of `files` against its sha256 in `checksums`.
        """
        if self.content_sha256 is not None and self.content_sha256 != self.content_digest():
            return f"{METADATA} was edited after the export (its content no longer matches its content_sha256)"
        for role, name in self.files.items():
            path = Path(folder) / name
            if not path.is_file():
                return f"{name} (files.{role}) is missing"
            if _sha256_file(path) != self.checksums.get(name):
                return f"{name} was modified after the export (its sha256 differs from the one {METADATA} records)"
        return None

    # ------------------------------------------------------------ typed views

    def model_config(self) -> ViTAEConfig:
        return ViTAEConfig.from_dict(self.config)

    def preprocessing_config(self) -> Preprocessing:
        return Preprocessing.from_dict(self.preprocessing)

    @property
    def max_batch(self) -> int:
        """The largest batch the artifacts were exported (and a TensorRT profile built) for."""
        return int(self.settings.get("max_batch", 1))

    def tensor_shape(self, name: str) -> list[int] | None:
        """The declared shape of the graph's input or output `name` (batch dim -1), or None when it has none."""
        entry = next((t for t in self.inputs + self.outputs if t.get("name") == name), None)
        return [int(d) for d in entry["shape"]] if entry is not None else None

    def path(self, folder: Path, role: str) -> Path | None:
        """Path of the file `files[role]` in `folder`, or None when the export did not write it (or it is gone)."""
        name = self.files.get(role)
        if not name:
            return None
        path = folder / name
        return path if path.exists() else None
