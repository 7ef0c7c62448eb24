"""MkDocs hooks: the pages that must not drift are rendered from their sources at build time.

- `<!-- settings-table -->` becomes the table of `service.settings.Settings`: each field's variable, type,
  default and description, read from the class itself.
- `<!-- csv-table: PATH -->` becomes the table of a CSV file (PATH relative to the repository root). A CSV with the
  columns that `benchmarks/results.py` writes (date, machine, cpu_flags, versions, command) is shown one run at a
  time, each table under the machine, date, versions and command that measured it.
- `changelog.md` is generated from the repository's `CHANGELOG.md`, so the site and the file are one text.

`render_settings_table` and `render_csv_table` are plain functions; `tests/test_docs.py` calls them directly.
"""

from __future__ import annotations

import csv
import re
import sys
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*(settings-table|csv-table:\s*(?P<path>\S+))\s*-->")
# The columns benchmarks/results.py writes before a benchmark's own figures, in that order.
RUN_COLUMNS = ("date", "machine", "cpu_flags", "versions", "command", "source")


# --- the settings table -------------------------------------------------------------------------------------------


def _type_name(annotation: object) -> str:
    """A reader's name for a field's type: the accepted values for a Literal, `path`, `integer`..."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return " \\| ".join(_type_name(arg) for arg in args) + " (optional)"
    if origin is list:
        return "comma-separated list"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", Path: "path"}
    if annotation in names:
        return names[annotation]
    return getattr(annotation, "__name__", str(annotation)).replace("SecretStr", "secret string")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "empty" if not value else f"`{value}`"
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _bounds(field) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = []
    for constraint in field.metadata:
        for attribute, symbol in words.items():
            value = getattr(constraint, attribute, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return f" ({', '.join(found)})" if found else ""


def render_settings_table() -> str:
    """One row per field of `service.settings.Settings`: variable, type, default, description."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from service.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    rows = ["| variable | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| `{prefix}{name.upper()}` | {_type_name(field.annotation)}{_bounds(field)} | {_default(field)} "
            f"| {description} |"
        )
    return "\n".join(rows)


# --- CSV tables ---------------------------------------------------------------------------------------------------


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(name.replace("_", " ")) for name in header) + " |"]
    lines.append("| " + " | ".join("---" for _ in header) + " |")
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def render_csv_table(path: Path) -> str:
    """A CSV as Markdown; benchmark results one table per run, under the machine, date and command of that run."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = list(reader.fieldnames or [])
        records = list(reader)
    if not header:
        raise ValueError(f"{path}: empty CSV (no header)")
    context = [name for name in RUN_COLUMNS if name in header]
    figures = [name for name in header if name not in RUN_COLUMNS]
    if not context:
        return _markdown_table(header, [[record[name] or "" for name in header] for record in records])

    runs: dict[tuple[str, ...], list[dict[str, str]]] = {}
    for record in records:
        runs.setdefault(tuple(record.get(name) or "" for name in context), []).append(record)
    blocks = []
    for key, run in runs.items():
        about = dict(zip(context, key, strict=True))
        shown = [name for name in figures if any(record[name] for record in run)]
        caption = [f"**{about.get('date', '')}**, {about.get('machine', '')}"]
        if about.get("cpu_flags"):
            caption.append(f"CPU flags: {about['cpu_flags']}")
        if about.get("versions"):
            caption.append(about["versions"])
        lines = ["; ".join(caption) + ".", ""]
        if about.get("command"):
            lines += [f"Command: `{about['command']}`", ""]
        if about.get("source"):
            lines += [f"Source: {about['source']}", ""]
        lines.append(_markdown_table(shown, [[record[name] or "" for name in shown] for record in run]))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_markers(markdown: str) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["path"] is None:
            return render_settings_table()
        path = ROOT / match["path"]
        if not path.is_file():
            raise FileNotFoundError(f"csv-table: {match['path']} does not exist")
        return render_csv_table(path)

    return MARKER.sub(replace, markdown)


# --- MkDocs events ------------------------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text()))
    return files


def on_page_markdown(markdown, page, config, files):
    return render_markers(markdown)
