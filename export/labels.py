"""Class names for an export: a user's labels, a project checkpoint's own, or ImageNet-1k's for released weights.

Which names an export gets, first match wins:
1. `--labels FILE` (one name per line, or a JSON list), for any checkpoint; it must name every class.
2. The names a checkpoint of this project carries (ImageFolder folder names, Fashion-MNIST names).
3. Released weights with a 1000-class head: the ImageNet-1k names, in the order the release was trained
   with (sorted WordNet ids, n01440764 ... n15075141), and the WordNet ids. Inferring ImageNet-1k from
   the head size is what timm does for its pretrained models (`infer_imagenet_subset`).
4. Released weights with any other head: `class_<i>`, with a warning that asks for `--labels`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

# Provenance is in the file's header; it ships as package data (pyproject's tool.setuptools.package-data).
IMAGENET_1K_FILE = Path(__file__).resolve().parent / "data" / "imagenet1k_classes.tsv"
IMAGENET_1K_CLASSES = 1000

# Where an export's names came from, as metadata.json's `class_names_source` says it.
FROM_LABELS, FROM_CHECKPOINT, FROM_IMAGENET_1K, FROM_INDEX = "labels", "checkpoint", "imagenet-1k", "index"


class LabelsError(ValueError):
    """Labels that cannot be read or do not fit the model; the message says what is accepted."""


@dataclass(frozen=True)
class ClassNames:
    """The names of a model's classes in index order, where they came from, and WordNet ids when known."""

    names: list[str]
    source: str
    wordnet_ids: list[str] | None = None


@cache
def _imagenet_1k() -> tuple[tuple[str, ...], tuple[str, ...]]:
    ids, names = [], []
    for line in IMAGENET_1K_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            wnid, name = line.split("\t")
            ids.append(wnid)
            names.append(name)
    if len(ids) != IMAGENET_1K_CLASSES or ids != sorted(ids):
        raise RuntimeError(f"{IMAGENET_1K_FILE} is damaged: expected 1000 sorted WordNet ids, got {len(ids)}")
    return tuple(ids), tuple(names)


def imagenet_1k() -> ClassNames:
    """The ImageNet-1k class names and WordNet ids, index 0 (tench) to 999 (toilet tissue)."""
    ids, names = _imagenet_1k()
    return ClassNames(list(names), FROM_IMAGENET_1K, list(ids))


def read_labels_file(path: str | Path) -> list[str]:
    """Class names from a file: a JSON list of strings, or one name per line. Raises LabelsError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"cannot read the labels file {path}: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except ValueError as exc:
            raise LabelsError(f"{path} starts like a JSON list but is not valid JSON: {exc}") from exc
        if not all(isinstance(name, str) for name in names):
            raise LabelsError(f"{path} must be a JSON list of strings (class names in index order)")
    else:
        names = text.splitlines()
        while names and not names[-1].strip():  # a trailing newline or two is not a class
            names.pop()
    names = [name.strip() for name in names]
    blank = [i for i, name in enumerate(names) if not name]
    if blank:
        where = "entries" if text.lstrip().startswith("[") else "lines"
        raise LabelsError(f"{path} has empty class names ({where} {', '.join(str(i + 1) for i in blank[:10])})")
    if not names:
        raise LabelsError(f"{path} names no classes; give one name per line or a JSON list")
    return names


def labels_digest(labels: Sequence[str] | None) -> str | None:
    """A short fingerprint of user labels (None when none were given), so new labels make an export stale."""
    if labels is None:
        return None
    return hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()


def resolve_class_names(
    num_classes: int, *, checkpoint_names: Sequence[str] | None, labels: Sequence[str] | None
) -> ClassNames:
    """The names to export (see the module docstring for the order); LabelsError when labels miscount."""
    if labels is not None:
        if len(labels) != num_classes:
            raise LabelsError(
                f"the labels give {len(labels)} names but the model has {num_classes} classes; "
                "give exactly one name per class, in index order (one per line or a JSON list)"
            )
        return ClassNames([str(name) for name in labels], FROM_LABELS)
    if checkpoint_names is not None:
        return ClassNames(list(checkpoint_names), FROM_CHECKPOINT)
    if num_classes == IMAGENET_1K_CLASSES:
        log.info("released weights with 1000 classes: naming them with the ImageNet-1k classes")
        return imagenet_1k()
    log.warning("released weights with %d classes carry no class names: using class_<i>; pass --labels", num_classes)
    return ClassNames([f"class_{i}" for i in range(num_classes)], FROM_INDEX)
