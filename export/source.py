"""What to export: this project's checkpoints (their metadata says everything) or released ViTAE weights."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from model import CheckpointError, ViTAE, create_model, get_variant, load_weights
from model.checkpoint import load_checkpoint, read_checkpoint_metadata

from .labels import resolve_class_names


@dataclass
class Source:
    """A loaded model and the facts about it that go into the export's metadata."""

    model: ViTAE
    name: str
    variant: str
    class_names: list[str]
    released: bool
    class_names_source: str
    wordnet_ids: list[str] | None = None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def project_metadata(path: Path) -> dict | None:
    """The checkpoint's project metadata, None for foreign files; a CheckpointError for unreadable ones."""
    try:
        return read_checkpoint_metadata(path)
    except CheckpointError:
        raise
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # truncated header, bad JSON, unreadable file
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}") from exc


def load_source(
    checkpoint: Path,
    *,
    variant: str | None = None,
    num_classes: int | None = None,
    labels: Sequence[str] | None = None,
) -> Source:
    """Load the model to export, strictly, and name its classes (`labels` override the checkpoint's names).

    Raises FileNotFoundError, CheckpointError, or ValueError (export.labels.LabelsError when labels miscount).
    """
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    meta = project_metadata(checkpoint)
    if meta is not None:
        ours = meta.get("variant")
        if variant is not None and variant != ours:
            raise ValueError(
                f"{checkpoint} is a {ours!r} checkpoint of this project; --variant {variant} contradicts it"
            )
        model, meta = load_checkpoint(checkpoint)
        if num_classes is not None and num_classes != model.num_classes:
            raise ValueError(
                f"{checkpoint} has {model.num_classes} classes; --num-classes {num_classes} contradicts it"
            )
        classes = resolve_class_names(model.num_classes, checkpoint_names=meta["class_names"], labels=labels)
        return Source(
            model,
            name=ours,
            variant=ours,
            class_names=classes.names,
            released=False,
            class_names_source=classes.source,
            wordnet_ids=classes.wordnet_ids,
        )
    if variant is None:
        raise ValueError(
            f"{checkpoint} is not a checkpoint of this project (no metadata); for released ViTAE weights "
            "pass --variant (and --num-classes when not 1000)"
        )
    base = get_variant(variant)
    head = 1000 if num_classes is None else num_classes
    model = create_model(variant, num_classes=head, img_size=base.img_size, in_chans=base.in_chans)
    load_weights(model, checkpoint)
    classes = resolve_class_names(head, checkpoint_names=None, labels=labels)
    return Source(
        model.eval(),
        name=variant,
        variant=variant,
        class_names=classes.names,
        released=True,
        class_names_source=classes.source,
        wordnet_ids=classes.wordnet_ids,
    )
