"""Artifacts edited after the export are refused at start with one line naming the file and what to do,
or rebuilt when auto-export is on; metadata.json is covered by a digest of its own content."""

from __future__ import annotations

import json
import logging
import shutil
import time

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from support.server import serving

from export.artifacts import ArtifactsMetadata


@pytest.fixture
def copy(artifacts, tmp_path):
    folder = tmp_path / "artifacts"
    shutil.copytree(artifacts, folder, ignore=shutil.ignore_patterns("openvino_cache"))
    return folder


def start_failure(url: str, timeout: float = 60.0) -> str:
    """The detail of /readyz once the start has failed; fails the test if the service became ready instead."""
    deadline = time.monotonic() + timeout
    while True:
        body = httpx.get(f"{url}/readyz").json()
        assert body["status"] != "ready", "tampered artifacts were served"
        if body["status"] == "failed":
            return body["detail"]
        assert time.monotonic() < deadline, f"the start neither failed nor succeeded: {body}"
        time.sleep(0.05)


def change_head_bias(folder) -> None:
    """A valid model.onnx whose classifier bias was changed (what the probe served as ready)."""
    path = folder / ArtifactsMetadata.read(folder).files["onnx"]
    model = onnx.load(str(path))
    classes = len(ArtifactsMetadata.read(folder).class_names)
    bias = next(t for t in model.graph.initializer if list(t.dims) == [classes])
    bias.CopyFrom(
        numpy_helper.from_array(numpy_helper.to_array(bias) + np.arange(classes, dtype=np.float32), bias.name)
    )
    onnx.save(model, str(path))


def swap_class_names(folder) -> None:
    path = folder / "metadata.json"
    meta = json.loads(path.read_text())
    meta["class_names"][0], meta["class_names"][1] = meta["class_names"][1], meta["class_names"][0]
    path.write_text(json.dumps(meta, indent=2))


def delete_onnx(folder) -> None:
    (folder / ArtifactsMetadata.read(folder).files["onnx"]).unlink()


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (change_head_bias, "model.onnx was modified"),
        (swap_class_names, "metadata.json was edited"),
        (delete_onnx, "model.onnx"),
    ],
    ids=["onnx-bias", "class-names", "onnx-deleted"],
)
def test_tampered_artifacts_are_refused_with_one_line_naming_the_file(copy, tamper, named, caplog):
    tamper(copy)
    with caplog.at_level(logging.INFO), serving(copy, ready=False, auto_export=False) as url:
        detail = start_failure(url)
    assert named in detail and "VITAE_AUTO_EXPORT" in detail, detail
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1 and "\n" not in failures[0].getMessage(), [r.getMessage() for r in failures]
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG], "a traceback was logged"


def test_an_edited_metadata_json_is_rebuilt_when_auto_export_is_on(tiny_checkpoint, copy):
    names = ArtifactsMetadata.read(copy).class_names
    swap_class_names(copy)
    with serving(copy, auto_export=True, checkpoint=tiny_checkpoint) as url:
        served = httpx.get(f"{url}/model").json()["class_names"]
    assert served == names
    assert ArtifactsMetadata.read(copy).integrity_problem(copy) is None


def test_metadata_json_digest_covers_every_field_and_survives_a_rewrite(artifacts, tmp_path):
    meta = ArtifactsMetadata.read(artifacts)
    assert meta.content_sha256 == meta.content_digest()
    meta.write(tmp_path)  # what the export writes reads back with a matching digest
    shutil.copy(artifacts / meta.files["head"], tmp_path)
    again = ArtifactsMetadata.read(tmp_path)
    assert again.content_sha256 == again.content_digest()
    edited = json.loads((tmp_path / "metadata.json").read_text()) | {"version": "other"}
    assert ArtifactsMetadata.from_dict(edited).content_digest() != again.content_sha256
