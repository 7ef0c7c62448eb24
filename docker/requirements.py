"""Print the project's requirements from pyproject.toml, one a line: `python requirements.py [--extra NAME ...]`.

The images install these before copying the source, so the heavy layer (torch) stays cached across code
changes, and pyproject.toml stays the one list of dependencies.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement string."""
    name = re.split(r"[\s\[<>=!~;@(]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """The project's dependencies plus those of `extras`, ready for `pip install -r`."""
    project = pyproject["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += project["optional-dependencies"][extra]
    names = {requirement_name(r) for r in found}
    # onnxruntime and onnxruntime-gpu install the same `onnxruntime` package: with both, whichever pip
    # installs last wins and the CUDA execution provider can go missing. The GPU build also runs on CPU.
    if "onnxruntime-gpu" in names:
        found = [r for r in found if requirement_name(r) != "onnxruntime"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group to add")
    args = parser.parse_args(argv)
    with args.pyproject.open("rb") as f:
        pyproject = tomllib.load(f)
    unknown = sorted(set(args.extra) - set(pyproject["project"].get("optional-dependencies", {})))
    if unknown:
        parser.error(f"no optional-dependencies group {', '.join(unknown)} in {args.pyproject}")
    print("\n".join(requirements(pyproject, args.extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
