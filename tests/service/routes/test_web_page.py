"""The web page at `/` and the offline `/docs`: over HTTP, and in a real headless Chromium against the real service.

The browser tests drive Debian's chromium (`make test` installs it) with Playwright; every request that leaves
127.0.0.1 is aborted and recorded, so a page that needs the internet fails them. Screenshots of the page with
answers are kept under test-artifacts/ui/ (git-ignored); `make ui-screenshot` copies the README's one.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support.browser import CHROMIUM, CHROMIUM_ARGS, OfflineContext
from support.checkpoints import DEMO_CHECKPOINT, ROOT, exported
from support.images import SAMPLES, sample_images
from support.server import serving, wait_ready

from service.routes import docs as docs_routes
from service.routes import ui as ui_routes

SCREENSHOTS = ROOT / "test-artifacts" / "ui"
ANKLE_BOOT = SAMPLES / "test00000_ankle-boot.png"
SNEAKER = SAMPLES / "test00009_sneaker.png"
TROUSER = SAMPLES / "test00002_trouser.png"
NOT_AN_IMAGE = b"these are notes, not a picture\n"
DESKTOP = {"width": 1100, "height": 800}
PHONE = {"width": 375, "height": 740}
# ReDoc's footer shows a logo from its CDN, hard-coded in redoc.standalone.js; the docs' CSP refuses it and ReDoc
# hides the image. The only outside load tolerated, and only as refused by the policy (never on the network).
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
TIMEOUT_MS = 60_000  # generous: the machine running the tests may be busy


@pytest.fixture(scope="module")
def demo_artifacts(tmp_path_factory) -> Path:
    """The shipped demo model, exported into a temporary folder (its labels make the page's answers checkable)."""
    if not DEMO_CHECKPOINT.is_file():
        pytest.skip(f"the demo checkpoint {DEMO_CHECKPOINT} is not there")
    folder = tmp_path_factory.mktemp("demo")
    for path in DEMO_CHECKPOINT.parent.glob(DEMO_CHECKPOINT.stem + ".*"):
        shutil.copy(path, folder / path.name)
    return exported(folder / DEMO_CHECKPOINT.name)


@pytest.fixture(scope="module")
def demo_url(demo_artifacts):
    with serving(demo_artifacts) as base:
        yield base


def classify_file(url: str, name: str, data: bytes, content_type: str = "image/png", **params) -> httpx.Response:
    return httpx.post(f"{url}/classify", params=params, files=[("file", (name, data, content_type))], timeout=60)


def local_references(html: str) -> list[str]:
    """Every src/href value of an HTML page."""
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)


# ------------------------------------------------------------------ over HTTP


def test_the_page_and_its_assets_are_served_without_the_api_key(artifacts):
    with serving(artifacts, api_key="page-secret") as base:
        page = httpx.get(f"{base}/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for name, media_type in ui_routes.ASSETS.items():
            asset = httpx.get(f"{base}/ui/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(media_type)
        # ... while the API calls the page makes need the key.
        assert httpx.get(f"{base}/model").status_code == 401
        assert classify_file(base, "a.png", sample_images(1)[0]).status_code == 401
        assert httpx.get(f"{base}/model", headers={"X-API-Key": "page-secret"}).status_code == 200


def test_the_page_refers_to_nothing_outside_the_service():
    folder = ui_routes.static_folder()
    html = (folder / ui_routes.PAGE).read_text()
    references = local_references(html)
    assert sorted(references) == ["docs", "redoc", "ui/app.css", "ui/app.js", "ui/favicon.svg"]
    for name in [ui_routes.PAGE, *ui_routes.ASSETS]:
        text = re.sub(r'xmlns="[^"]*"', "", (folder / name).read_text())  # a namespace name, never fetched
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), name
        assert "@import" not in text and "@font-face" not in text, name


def test_an_unknown_page_asset_is_404_naming_the_assets(artifacts):
    with serving(artifacts) as base:
        response = httpx.get(f"{base}/ui/secrets.txt")
        assert response.status_code == 404
        assert "app.js" in response.json()["detail"] and "secrets.txt" in response.json()["detail"]


def test_vitae_ui_false_serves_no_page_but_keeps_the_api_and_docs(artifacts, monkeypatch):
    monkeypatch.setenv("VITAE_UI", "false")
    with serving(artifacts) as base:
        assert httpx.get(f"{base}/").status_code == 404
        assert httpx.get(f"{base}/ui/app.js").status_code == 404
        assert httpx.get(f"{base}/docs").status_code == 200
        assert classify_file(base, "a.png", sample_images(1)[0]).status_code == 200


@pytest.mark.parametrize("page", ["docs", "redoc"])
def test_docs_pages_load_every_asset_from_the_service(artifacts, page):
    with serving(artifacts) as base:
        response = httpx.get(f"{base}/{page}")
        assert response.status_code == 200
        references = local_references(response.text)
        assert references, response.text
        for reference in references:
            assert reference.startswith(docs_routes.ASSETS_PATH + "/"), reference
            asset = httpx.get(f"{base}{reference}")
            assert asset.status_code == 200 and len(asset.content) > 1000, reference
        assert "fonts.googleapis" not in response.text
        assert httpx.get(f"{base}/openapi.json").status_code == 200


def test_an_installed_package_ships_the_page(tmp_path):
    """The wheel pip builds from pyproject.toml carries service/static/ (package data), not only the source tree."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the work tree
    source.mkdir()
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy(ROOT / name, source / name)
    for package in ["model", "export", "service"]:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run([*pip_wheel, "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("vitae_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in [ui_routes.PAGE, *ui_routes.ASSETS]:
        assert f"service/static/{name}" in names
    assert "service/routes/ui.py" in names and "service/routes/docs.py" in names


# ------------------------------------------------------------------ in a real browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` (part of `make test`) installs Debian's chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: `make setup`")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def offline(browser):
    """Opens offline browser contexts; after the test, none of them may have tried to reach the internet."""
    contexts: list[OfflineContext] = []

    def open_context(**options) -> OfflineContext:
        contexts.append(OfflineContext(browser, timeout_ms=TIMEOUT_MS, **({"viewport": DESKTOP} | options)))
        return contexts[-1]

    yield open_context
    for context in contexts:
        context.close()
    outside = [url for context in contexts for url in context.outside]
    assert outside == [], f"the page tried to reach the internet: {outside}"
    refused = [text for context in contexts for text in context.refused if REDOC_LOGO not in text]
    assert refused == [], f"the page tried to load what its Content-Security-Policy forbids: {refused}"


def upload(page, *files) -> None:
    page.locator("#file-input").set_input_files(list(files))


def card_top1(card) -> str:
    """Waits for the card's answer; its top-1 label."""
    card.locator(".status[data-top1]").wait_for()
    return card.locator(".status").get_attribute("data-top1")


def wait_for_overlay(card) -> str:
    """Waits for the card's Grad-CAM heatmap to be drawn; its data URL."""
    heatmap = card.locator("img.heatmap")
    heatmap.wait_for(state="visible")
    card.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=heatmap.element_handle())
    return heatmap.get_attribute("src")


def screenshot(page, name: str, full_page: bool = True) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=full_page)
    return path


def readme_screenshot(page) -> Path:
    """The viewport only, as a small palette PNG (README.md shows it; `make ui-screenshot` copies it to docs/)."""
    path = screenshot(page, "readme", full_page=False)
    Image.open(path).convert("RGB").quantize(colors=96, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def test_a_sample_gets_the_services_top_class_and_its_grad_cam(offline, demo_url):
    page = offline().open(f"{demo_url}/")
    with page.expect_file_chooser() as chooser:  # the picker, opened from the keyboard
        page.locator("#choose-button").focus()
        page.keyboard.press("Enter")
    chooser.value.set_files(ANKLE_BOOT)
    card = page.locator(".card").first
    shown = card_top1(card)
    source = wait_for_overlay(card)

    answer = classify_file(demo_url, ANKLE_BOOT.name, ANKLE_BOOT.read_bytes(), cam="true").json()
    assert shown == answer["predictions"][0]["label"] == "Ankle boot"
    assert source.startswith("data:image/png;base64,")
    heatmap = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
    assert heatmap.size == Image.open(ANKLE_BOOT).size
    assert card.locator(".cam-label").inner_text() == "Ankle boot"
    assert card.locator(".prediction").count() == 5
    assert card.locator(".prediction").first.get_attribute("aria-pressed") == "true"
    assert "inference" in card.locator(".timing").inner_text()
    assert "vitae_fmnist" in page.locator("#model-info").inner_text()
    assert "onnxruntime" in page.locator("#model-info").inner_text()
    screenshot(page, "answer")
    assert page.errors == []


def test_choosing_another_class_by_keyboard_redraws_the_overlay(offline, demo_url):
    page = offline().open(f"{demo_url}/")
    upload(page, ANKLE_BOOT)
    card = page.locator(".card").first
    card_top1(card)
    before = wait_for_overlay(card)

    second = card.locator(".prediction").nth(1)
    wanted = second.locator(".label").inner_text()
    second.focus()
    page.keyboard.press("Enter")
    card.locator(".cam-label", has_text=wanted).wait_for()
    after = wait_for_overlay(card)
    assert after != before
    assert card.locator(".prediction[aria-pressed=true] .label").inner_text() == wanted
    expected = classify_file(demo_url, "a.png", ANKLE_BOOT.read_bytes(), cam="true", cam_class=wanted).json()
    assert card.locator("img.heatmap").get_attribute("data-class-index") == str(expected["cam"]["class_index"])

    # The view toggles and the opacity slider act on the heatmap layer.
    heatmap = card.locator("img.heatmap")
    card.get_by_label("original", exact=True).check()
    assert heatmap.evaluate("img => getComputedStyle(img).visibility") == "hidden"
    card.get_by_label("heatmap", exact=True).check()
    assert heatmap.evaluate("img => getComputedStyle(img).opacity") == "1"
    card.get_by_label("overlay", exact=True).check()
    card.locator(".opacity-input").fill("20")
    assert heatmap.evaluate("img => [getComputedStyle(img).visibility, getComputedStyle(img).opacity]") == [
        "visible",
        "0.2",
    ]
    assert page.errors == []


@pytest.mark.parametrize(
    ("model", "line"),
    [
        (
            {"name": "m", "version": "2", "backend": "openvino", "device": "cpu", "precision": "int8"},
            "m (version 2) · openvino on cpu · int8",
        ),
        (
            {"name": "m", "backend": {"name": "tensorrt", "device": "cuda:0", "precision": "fp16"}, "class_names": {}},
            "m · tensorrt on cuda:0 · fp16",
        ),
        ({"class_names": ["a", "b", "c"], "extra": [1, 2]}, "unnamed model · 3 classes"),
    ],
    ids=["flat", "nested", "sparse"],
)
def test_the_model_line_reads_whatever_model_returns(offline, demo_url, model, line):
    """/model grows fields (precision, backend details); the page shows what it finds and skips what it lacks."""
    page = offline().open(f"{demo_url}/")
    page.locator("#model-info", has_text="vitae_fmnist").wait_for()
    page.evaluate("model => showModel(model)", model)
    assert page.locator("#model-info").inner_text() == line
    assert page.errors == []


def test_a_text_file_shows_the_services_error(offline, demo_url):
    page = offline().open(f"{demo_url}/")
    upload(page, {"name": "notes.txt", "mimeType": "text/plain", "buffer": NOT_AN_IMAGE})
    error = page.locator(".card .error-text")
    error.wait_for()
    detail = classify_file(demo_url, "notes.txt", NOT_AN_IMAGE, "text/plain").json()["detail"]
    assert "(400)" in error.inner_text() and detail in error.inner_text()
    assert page.errors == []


DROP_AND_PASTE = """(data) => {
    const file = (name) => {
        const transfer = new DataTransfer();
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        return transfer;
    };
    const zone = document.getElementById("drop-zone");
    zone.dispatchEvent(new DragEvent("drop", { dataTransfer: file("dropped.png"), bubbles: true, cancelable: true }));
    document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: file("pasted.png"), bubbles: true }));
}"""


def test_several_dropped_and_pasted_images_get_one_card_each(offline, demo_url):
    page = offline(viewport={"width": 1280, "height": 790}).open(f"{demo_url}/")
    upload(page, ANKLE_BOOT, TROUSER)
    cards = page.locator(".card")
    for i in range(2):
        card_top1(cards.nth(i))
        wait_for_overlay(cards.nth(i))
    readme_screenshot(page)

    # What a drop from the file manager and a paste of a copied image deliver: DataTransfer objects with files.
    page.evaluate(DROP_AND_PASTE, base64.b64encode(ANKLE_BOOT.read_bytes()).decode())
    upload(page, SNEAKER)
    cards.nth(4).wait_for()
    assert cards.count() == 5
    names = [cards.nth(i).locator(".file-name").inner_text() for i in range(5)]
    assert names == [ANKLE_BOOT.name, TROUSER.name, "dropped.png", "pasted.png", SNEAKER.name]
    labels = [card_top1(cards.nth(i)) for i in range(5)]
    assert labels == ["Ankle boot", "Trouser", "Ankle boot", "Ankle boot", "Sneaker"]
    for i in range(5):
        wait_for_overlay(cards.nth(i))
    screenshot(page, "several")
    assert page.errors == []


def test_the_page_fits_a_phone_width_screen(offline, demo_url):
    page = offline(viewport=PHONE, is_mobile=True, has_touch=True).open(f"{demo_url}/")
    upload(page, ANKLE_BOOT)
    card = page.locator(".card").first
    card_top1(card)
    wait_for_overlay(card)
    assert page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth") <= 0
    for part in [".stage", ".predictions", ".view-controls", ".timing"]:
        box = card.locator(part).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], part
    screenshot(page, "phone")
    assert page.errors == []


def test_with_several_models_the_page_lets_a_person_pick_one(offline, tmp_path, artifacts, tiny_rgb_checkpoint):
    from benchmarks.harness import publish_version

    repo = tmp_path / "repo"
    publish_version(repo, "tiny", "1", artifacts)  # 10 Fashion-MNIST classes, the default
    publish_version(repo, "rgb", "1", exported(tiny_rgb_checkpoint))  # 5 classes named class_0 ... class_4
    with serving(artifacts, model_repository=repo, default_model="tiny") as base:
        page = offline().open(f"{base}/")
        picker = page.locator("#model-select")
        picker.wait_for(state="visible")
        assert picker.input_value() == "tiny"
        page.locator("#model-info", has_text="10 classes").wait_for()
        picker.select_option("rgb")
        page.locator("#model-info", has_text="5 classes").wait_for()
        upload(page, ANKLE_BOOT)
        assert card_top1(page.locator(".card").first).startswith("class_")  # answered by the model picked
        assert page.errors == []


def test_one_model_shows_no_picker(offline, artifacts):
    with serving(artifacts) as base:
        page = offline().open(f"{base}/")
        page.locator("#model-info", has_text="10 classes").wait_for()
        assert page.locator("#model-select").is_hidden()


def test_with_an_api_key_the_page_asks_for_it_and_sends_it(offline, artifacts):
    with serving(artifacts, api_key="page-secret") as base:
        page = offline().open(f"{base}/")
        key_form = page.locator("#key-form")
        key_form.wait_for(state="visible")
        upload(page, ANKLE_BOOT)
        card = page.locator(".card").first
        card.locator(".error-text", has_text="API key").wait_for()

        page.locator("#key-input").fill("page-secret")
        page.locator("#key-input").press("Enter")
        assert card_top1(card)
        wait_for_overlay(card)
        assert key_form.is_hidden()
        assert "vitae_fmnist" in page.locator("#model-info").inner_text()
        assert page.errors == []


class HeldBackend:
    """The real backend, whose calls wait while the test holds them: 503 while warm-up waits, 504 past a deadline."""

    def __init__(self, artifacts: Path, *, held: bool) -> None:
        from service.artifacts import read_artifacts
        from service.backends import OnnxRuntimeBackend

        self.real = OnnxRuntimeBackend(read_artifacts(artifacts), gpu=False, threads=1)
        self.name, self.device = self.real.name, self.real.device
        self.released = threading.Event()
        if not held:
            self.released.set()

    def infer(self, images):
        self.released.wait(60)
        return self.real.infer(images)

    def close(self) -> None:
        self.real.close()


def test_a_busy_service_is_reported_and_the_image_can_be_sent_again(offline, artifacts):
    backend = HeldBackend(artifacts, held=True)  # warm-up waits: the model stays "loading"
    with serving(artifacts, backend=backend, ready=False) as base:
        page = offline().open(f"{base}/")
        page.locator("#model-info", has_text="not ready").wait_for()
        upload(page, ANKLE_BOOT)
        card = page.locator(".card").first
        error = card.locator(".error-text", has_text="(503)")
        error.wait_for()
        assert "still loading" in error.inner_text()
        backend.released.set()
        wait_ready(base)
        card.locator(".retry").click()
        assert card_top1(card)
        assert card.locator(".error").is_hidden()
        page.locator("#model-info", has_text="vitae_fmnist").wait_for()  # the page asked /model again
        assert page.errors == []


def test_a_slow_answer_is_reported_and_the_image_can_be_sent_again(offline, artifacts):
    backend = HeldBackend(artifacts, held=False)
    with serving(artifacts, backend=backend, request_timeout_s=3) as base:
        page = offline().open(f"{base}/")
        page.locator("#model-info", has_text="vitae_fmnist").wait_for()
        backend.released.clear()  # the next batch outlives the request's deadline
        upload(page, ANKLE_BOOT)
        card = page.locator(".card").first
        error = card.locator(".error-text", has_text="(504)")
        error.wait_for()
        assert "too slow" in error.inner_text() and "VITAE_REQUEST_TIMEOUT_S" in error.inner_text()
        backend.released.set()
        card.locator(".retry").click()
        assert card_top1(card)
        assert card.locator(".error").is_hidden()
        assert page.errors == []


@pytest.mark.parametrize(("page_path", "rendered"), [("docs", ".opblock"), ("redoc", "[data-section-id]")])
def test_docs_render_the_operations_with_the_internet_blocked(offline, artifacts, page_path, rendered):
    with serving(artifacts) as base:
        page = offline().open(f"{base}/{page_path}")
        page.locator(rendered).first.wait_for()
        page.get_by_text("/classify").first.wait_for()
        assert page.locator(rendered).count() >= 5
        screenshot(page, page_path)
