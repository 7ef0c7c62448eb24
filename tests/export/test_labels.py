"""Class names: ImageNet-1k names for released weights, `--labels` for any checkpoint, names in answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from support.checkpoints import FASHION_CLASSES, ROOT
from support.images import drawn_image, encode
from support.server import serving

from export import export_artifacts
from export.labels import LabelsError, imagenet_1k, read_labels_file, resolve_class_names
from model import create_model
from service.artifacts import ensure_artifacts, match_class_name
from service.settings import Settings

# Well-known indices of the ImageNet-1k order (sorted WordNet ids), as the WordNet lemmas spell them.
IMAGENET_FIXED = {
    0: ("n01440764", "tench, Tinca tinca"),
    281: ("n02123045", "tabby, tabby cat"),
    409: ("n02708093", "analog clock"),
    999: ("n15075141", "toilet tissue, toilet paper, bathroom tissue"),
}


@pytest.fixture(scope="module")
def release_style_checkpoint(tmp_path_factory) -> Path:
    """Weights as the release ships them (a .pth.tar holding a bare state dict, no names) with a 1000-class head.

    The architecture is the registered `vitae_fmnist` (the released cells at a small width), so the export is fast.
    """
    torch.manual_seed(0)
    model = create_model("vitae_fmnist", num_classes=1000, img_size=32, in_chans=1)
    path = tmp_path_factory.mktemp("release") / "vitae_release_style.pth.tar"
    torch.save({"state_dict": model.state_dict(), "epoch": 300}, path)
    return path


@pytest.fixture(scope="module")
def release_export(release_style_checkpoint) -> tuple[Path, dict]:
    out = release_style_checkpoint.parent / "artifacts"
    meta = export_artifacts(release_style_checkpoint, out, variant="vitae_fmnist", max_batch=2)
    return out, meta


def run_export_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


# ------------------------------------------------------------------ the ImageNet-1k names


def test_imagenet_names_are_in_sorted_wordnet_order_at_the_well_known_indices():
    classes = imagenet_1k()
    assert len(classes.names) == len(classes.wordnet_ids) == 1000
    assert classes.wordnet_ids == sorted(set(classes.wordnet_ids))
    for index, (wnid, name) in IMAGENET_FIXED.items():
        assert (classes.wordnet_ids[index], classes.names[index]) == (wnid, name)


def test_released_weights_get_imagenet_names_only_with_a_1000_class_head():
    assert resolve_class_names(1000, checkpoint_names=None, labels=None).source == "imagenet-1k"
    other = resolve_class_names(7, checkpoint_names=None, labels=None)
    assert other.source == "index" and other.names == [f"class_{i}" for i in range(7)]


def test_project_checkpoints_keep_their_names_even_with_1000_classes():
    own = [f"folder_{i}" for i in range(1000)]
    classes = resolve_class_names(1000, checkpoint_names=own, labels=None)
    assert classes.names == own and classes.source == "checkpoint" and classes.wordnet_ids is None


def test_labels_override_any_names():
    labels = [f"mine_{i}" for i in range(10)]
    classes = resolve_class_names(10, checkpoint_names=FASHION_CLASSES, labels=labels)
    assert classes.names == labels and classes.source == "labels"


def test_labels_of_the_wrong_count_are_refused_with_both_counts():
    with pytest.raises(LabelsError, match="3 names but the model has 10 classes"):
        resolve_class_names(10, checkpoint_names=FASHION_CLASSES, labels=["a", "b", "c"])


# ------------------------------------------------------------------ labels files


def test_labels_file_one_name_per_line_or_a_json_list(tmp_path):
    lines = tmp_path / "labels.txt"
    lines.write_bytes(b"tabby, tabby cat\r\n  analog clock \r\n\n")
    assert read_labels_file(lines) == ["tabby, tabby cat", "analog clock"]
    listed = tmp_path / "labels.json"
    listed.write_text(json.dumps(["tabby, tabby cat", "analog clock"]))
    assert read_labels_file(listed) == ["tabby, tabby cat", "analog clock"]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("cat\n\ndog\n", "empty class names (lines 2)"),
        ('["cat", 3]', "JSON list of strings"),
        ('["cat", ', "not valid JSON"),
        ("\n\n", "names no classes"),
    ],
)
def test_bad_labels_files_say_what_is_wrong(tmp_path, content, fragment):
    path = tmp_path / "labels"
    path.write_text(content)
    with pytest.raises(LabelsError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        read_labels_file(path)


def test_missing_labels_file_is_a_labels_error(tmp_path):
    with pytest.raises(LabelsError, match="cannot read the labels file"):
        read_labels_file(tmp_path / "nowhere.txt")


# ------------------------------------------------------------------ class names asked for by name


IMAGENET_NAMES = imagenet_1k().names


@pytest.mark.parametrize(
    ("asked", "index"),
    [("tabby, tabby cat", 281), ("tabby cat", 281), ("Tabby", 281), ("analog clock", 409), ("toilet paper", 999)],
)
def test_a_class_is_found_by_its_label_or_one_of_its_synonyms(asked, index):
    assert match_class_name(IMAGENET_NAMES, asked) == index


def test_a_name_of_two_classes_asks_for_an_index():
    with pytest.raises(ValueError, match=r"ambiguous.*134 \('crane'\), 517 \('crane'\)"):
        match_class_name(IMAGENET_NAMES, "crane")


def test_an_unknown_name_gets_the_closest_names_not_all_thousand():
    with pytest.raises(ValueError) as caught:
        match_class_name(IMAGENET_NAMES, "tabby kat")
    message = str(caught.value)
    assert "'tabby, tabby cat'" in message and "0..999" in message and len(message) < 500


def test_an_unknown_name_among_few_classes_lists_them_all():
    with pytest.raises(ValueError, match="one of: T-shirt/top, Trouser, .*Ankle boot"):
        match_class_name(FASHION_CLASSES, "Cat")


# ------------------------------------------------------------------ export and service end to end


def test_release_style_export_writes_imagenet_names_and_wordnet_ids(release_export):
    out, meta = release_export
    written = json.loads((out / "metadata.json").read_text())
    assert written["class_names_source"] == "imagenet-1k"
    assert len(written["class_names"]) == len(written["wordnet_ids"]) == 1000
    for index, (wnid, name) in IMAGENET_FIXED.items():
        assert (written["wordnet_ids"][index], written["class_names"][index]) == (wnid, name)


def test_classify_answers_with_imagenet_names(release_export):
    out, _ = release_export
    image = encode(drawn_image(3, size=(32, 32)), "PNG")
    with serving(out) as url:
        card = httpx.get(f"{url}/model").json()
        answer = httpx.post(
            f"{url}/classify",
            params={"top_k": 1000, "cam": "true", "cam_class": "tabby cat"},
            files=[("file", ("drawn.png", image, "image/png"))],
        )
        wrong = httpx.post(
            f"{url}/classify",
            params={"cam": "true", "cam_class": "crane"},
            files=[("file", ("drawn.png", image, "image/png"))],
        )
    assert [card["class_names"][i] for i in IMAGENET_FIXED] == [name for _, name in IMAGENET_FIXED.values()]
    assert answer.status_code == 200, answer.text
    body = answer.json()
    labels = {p["index"]: p["label"] for p in body["predictions"]}
    assert len(labels) == 1000
    for index, (_, name) in IMAGENET_FIXED.items():
        assert labels[index] == name
    assert body["cam"]["class_index"] == 281 and body["cam"]["label"] == "tabby, tabby cat"
    assert wrong.status_code == 422 and "134" in wrong.json()["detail"] and "517" in wrong.json()["detail"]


def test_cli_labels_of_the_wrong_count_fail_cleanly(tiny_checkpoint, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    out = tmp_path / "out"
    done = run_export_cli("--checkpoint", str(tiny_checkpoint), "--labels", str(labels), "--out", str(out))
    assert done.returncode == 1
    assert "export failed: the labels give 3 names but the model has 10 classes" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_cli_labels_of_the_right_count_replace_the_checkpoint_names(tiny_checkpoint, tmp_path):
    names = [f"garment {i}" for i in range(10)]
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(names))
    out = tmp_path / "out"
    args = ("--checkpoint", str(tiny_checkpoint), "--labels", str(labels), "--out", str(out), "--max-batch", "2")
    done = run_export_cli(*args)
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["class_names"] == names and meta["class_names_source"] == "labels"
    # The service's start-up check keeps the names given with --labels rather than re-exporting without them.
    stamp = (out / "metadata.json").stat().st_mtime_ns
    settings = Settings(artifacts=out, checkpoint=tiny_checkpoint, max_batch_size=2, auto_export=True)
    assert ensure_artifacts(settings).class_names == names
    assert (out / "metadata.json").stat().st_mtime_ns == stamp
    # Without --labels the checkpoint's own names come back.
    assert export_artifacts(tiny_checkpoint, out, max_batch=2)["class_names"] == FASHION_CLASSES
