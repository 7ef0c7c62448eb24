"""Build artifacts beside the old ones and swap them in, inside the output folder itself.

The output folder is often a mount point (the GPU image's engine cache is a named volume on
/var/cache/vitae) whose parent the service cannot write (root-owned /var/cache, the service runs as uid
10001), and a mount point cannot be renamed (EBUSY). So nothing here renames, creates or removes anything
beside `out`: the staging folder lives inside `out`, and the swap renames entries within `out`.

A swap is a handful of renames on one filesystem. The old metadata.json goes first and the new one last,
so a reader in between sees no artifacts (stale: rebuild or wait), never a mix of two exports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

# Entries of `out` with this prefix belong to an export in progress (or one that crashed).
STAGING_PREFIX = ".export-staging-"


def foreign_entries(out: Path) -> list[str]:
    """Names in `out` that are not an export's staging leftovers."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX))


def remove_leftovers(out: Path) -> None:
    """Remove staging folders that a killed export left in `out` (one export runs per folder at a time)."""
    for path in out.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


def make_staging(out: Path) -> Path:
    """A fresh, empty staging folder inside `out` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))


def swap_in(staging: Path, out: Path, retire: Iterable[str], last: str) -> None:
    """Replace `out`'s entries named in `retire` (the previous export) by every entry of `staging`.

    `last` (metadata.json) is retired first and moved in last. Only entries of `out` move; `out` itself is
    neither renamed nor removed. On failure the previous entries are put back and the error re-raised.
    """
    incoming = sorted(p.name for p in staging.iterdir())
    ordered = [*(n for n in incoming if n != last), *([last] if last in incoming else [])]
    old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-", dir=out))
    retired: list[str] = []
    moved: list[str] = []
    try:
        for name in [last, *sorted(set(retire) | set(incoming) - {last})]:
            if os.path.lexists(out / name):
                (out / name).rename(old / name)
                retired.append(name)
        for name in ordered:
            (staging / name).rename(out / name)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            with contextlib.suppress(OSError):
                (out / name).rename(staging / name)
        for name in reversed(retired):
            with contextlib.suppress(OSError):
                (old / name).rename(out / name)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
