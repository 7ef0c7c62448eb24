"""The docs site builds, and what the README and docs name cannot drift from the project.

Each drift check reads the Markdown as a reader would follow it: a path in code is a file to open, `make X` a target
to run, `--flag` after a command an option to pass. One side changed alone fails the test.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.checkpoints import ROOT

README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").rglob("*.md"))
TEXTS = {path: path.read_text() for path in [README, ROOT / "CHANGELOG.md", *PAGES]}
# Repository paths a reader may be told to open start with one of these; others (runs/, artifacts/, photo.jpg) are
# what a command writes or the reader's own files.
REPO_ROOTS = ("model/", "export/", "service/", "docs/", "benchmarks/", "deploy/", "docker/", "tests/", "demo/", ".ci/")
REPO_FILES = ("Makefile", "pyproject.toml", "docker-compose.yml", "README.md", "CHANGELOG.md", "mkdocs.yml")
# Commands whose options the docs name, and how to ask each for its options.
COMMANDS = {
    "export": ["-m", "export"],
    "model.train": ["-m", "model.train"],
    "model.evaluate": ["-m", "model.evaluate"],
}
BENCHMARKS = [path for path in sorted((ROOT / "benchmarks").glob("*.py")) if path.stem != "results"]
COMMANDS |= {f"benchmarks/{path.name}": [str(path)] for path in BENCHMARKS}
FLAG = r"(?<![\w-])(--[a-z][a-z0-9-]*)"
# kubectl's TYPE/NAME arguments (`kubectl logs deploy/vitae`) look like paths and are not.
KUBECTL_RESOURCE = r"\b(?:deploy|deployment|service|svc|pod)/[\w-]+(?![\w./])"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def code_texts(text: str) -> list[str]:
    """Fenced blocks and inline code spans, where the docs put paths and commands."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    return fenced + re.findall(r"`([^`\n]+)`", prose)


def named_paths(text: str) -> set[str]:
    found = set()
    for code in code_texts(text):
        if "kubectl" in code:
            code = re.sub(KUBECTL_RESOURCE, "", code)
        for token in re.findall(r"[\w./@*<>{}$-]+", code):
            token = token.rstrip(".,:")
            if token.startswith(REPO_ROOTS) or token in REPO_FILES:
                found.add(token)
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    return found | {link for link in links if not link.startswith(("http://", "https://"))}


def missing_paths(path: Path, text: str) -> list[str]:
    missing = []
    for name in sorted(named_paths(text)):
        if any(mark in name for mark in ("<", "{", "*", "$")):
            continue
        candidates = [ROOT / name, path.parent / name]
        if name.endswith("/"):
            candidates = [ROOT / name.rstrip("/"), path.parent / name.rstrip("/")]
        if not any(candidate.exists() for candidate in candidates) and name != "changelog.md":
            missing.append(name)
    return missing


def named_make_targets(text: str) -> set[str]:
    return {target for code in code_texts(text) for target in re.findall(r"\bmake ([a-z][a-z0-9-]*)", code)}


def makefile_targets(makefile: str) -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, re.M))


def named_flags(text: str) -> dict[str, set[str]]:
    """{command: flags} for each command line in the docs (continuations joined), flags after the command only."""
    found: dict[str, set[str]] = {}
    for code in code_texts(text):
        for line in re.sub(r"\\\n", " ", code).splitlines():
            line = line.split(" # ")[0]
            for command in COMMANDS:
                pattern = rf"(?:-m {re.escape(command)}|python {re.escape(command)})(?![\w.])"
                if command == "model.train":
                    pattern = rf"(?:{pattern}|\$T2\b)"
                for match in re.finditer(pattern, line):
                    found.setdefault(command, set()).update(re.findall(FLAG, line[match.end() :]))
    return found


@functools.cache
def help_flags(command: str) -> frozenset[str]:
    result = subprocess.run(
        [sys.executable, *COMMANDS[command], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{command} --help failed: {result.stderr[-2000:]}"
    return frozenset(re.findall(FLAG, result.stdout))


# --- the site -----------------------------------------------------------------------------------------------------


def test_the_docs_site_builds_strictly(tmp_path):
    """A broken link, a missing anchor, a page left out of the nav or a failing hook fails the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    configuration = (tmp_path / "site" / "serving" / "configuration" / "index.html").read_text()
    assert "VITAE_MAX_BATCH_SIZE" in configuration and "settings-table" not in configuration
    benchmarks = (tmp_path / "site" / "benchmarks" / "index.html").read_text()
    assert "python benchmarks/bench_service.py --requests 256" in benchmarks


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the reference belongs in docs/"
    first_screen = "\n".join(lines[:60])
    for needed in ("make serve", "make test", "model/", "export/", "service/"):
        assert needed in first_screen, f"{needed!r} not on the README's first screen"
    for example in ("curl -F file=@", "docs/ui.png", "tritonclient", "python -m export", "docker compose", "kubectl"):
        assert example in README.read_text(), f"the README has no example with {example!r}"


# --- drift --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(TEXTS), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_the_docs_name_exists(path):
    assert missing_paths(path, TEXTS[path]) == []


def test_every_make_target_the_docs_name_exists():
    targets = makefile_targets((ROOT / "Makefile").read_text())
    named = {target for text in TEXTS.values() for target in named_make_targets(text)}
    assert {"serve", "test", "docs"} <= named
    assert named - targets == set()


def test_every_flag_the_docs_name_is_in_that_commands_help():
    named: dict[str, set[str]] = {}
    for text in TEXTS.values():
        for command, flags in named_flags(text).items():
            named.setdefault(command, set()).update(flags)
    assert {"export", "model.train"} <= set(named)
    unknown = {command: sorted(flags - help_flags(command)) for command, flags in named.items()}
    assert {command: flags for command, flags in unknown.items() if flags} == {}


def test_python_m_service_takes_no_options_in_the_docs():
    """`python -m service` is configured by VITAE_* variables only; a flag after it would be ignored."""
    for path, text in TEXTS.items():
        for code in code_texts(text):
            assert not re.search(r"-m service\s+--", code), f"{path}: python -m service takes no options"


def test_the_configuration_page_lists_exactly_the_settings():
    from service.settings import Settings

    table = load_hooks().render_settings_table()
    rows = re.findall(r"^\| `(VITAE_[A-Z0-9_]+)` \|", table, re.M)
    assert rows == [f"VITAE_{name.upper()}" for name in Settings.model_fields]
    assert "| `VITAE_MAX_BATCH_SIZE` | integer (≥ 1, ≤ 4096) | `32` |" in table


def test_a_benchmark_table_shows_its_machine_date_and_command(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results import RUN_COLUMNS, append_rows

    figures = [{"what": "raw", "images_per_s": 21.04}, {"what": "service", "images_per_s": 20}]
    path = append_rows("demo", figures, tmp_path)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[: len(RUN_COLUMNS)] == list(RUN_COLUMNS)
    assert rows[0]["images_per_s"] == "21.04" and rows[0]["machine"] and rows[0]["date"]
    with pytest.raises(ValueError, match="columns"):
        append_rows("demo", [{"what": "raw", "p50_ms": 3}], tmp_path)
    rendered = load_hooks().render_csv_table(path)
    assert rows[0]["machine"] in rendered and f"Command: `{rows[0]['command']}`" in rendered
    assert "| what | images per s |" in rendered


@pytest.mark.parametrize("csv_path", sorted((ROOT / "benchmarks" / "results").glob("*.csv")), ids=lambda p: p.name)
def test_every_recorded_result_says_where_and_how_it_was_measured(csv_path):
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows, f"{csv_path.name} has no rows"
    for row in rows:
        assert row["date"] and row["machine"] and row["command"], f"{csv_path.name}: {row}"
    assert any(f"csv-table: benchmarks/results/{csv_path.name}" in text for text in TEXTS.values()), (
        f"{csv_path.name} is rendered on no page"
    )
