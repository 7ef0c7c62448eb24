"""The export writes into a folder it may fill but not rename: a volume's mount point under a read-only parent.

The GPU image's engine cache is a named volume mounted on /var/cache/vitae; /var/cache is root's and the service
runs as uid 10001, and a mount point cannot be renamed (EBUSY). Two ways of proving the export copes:

* a real mount point: in a user + mount namespace (`unshare -rm`, no privileges needed where the kernel allows
  unprivileged user namespaces) the parent is bind-mounted read-only and a separate "volume" folder is bind-mounted
  onto `out`. chmod would not do, since these tests often run as root, which ignores permission bits; a read-only
  mount stops root too.
* everywhere (also where namespaces are not allowed, e.g. inside a container): a Python audit hook in the export's
  process refuses every rename, removal or creation that touches `out` itself or anything beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.checkpoints import ROOT

from export import export_artifacts
from export.staging import STAGING_PREFIX

MAX_BATCH = "2"


def can_unshare() -> str | None:
    """None when an unprivileged user + mount namespace can bind-mount here, else why not."""
    if shutil.which("unshare") is None:
        return "the unshare command is not installed"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", 'd="$(mktemp -d)" && mount --bind "$d" "$d" 2>&1; s=$?; rmdir "$d"; exit $s'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"no user + mount namespaces here ({(probe.stderr or probe.stdout).strip()[:120]})"
    return None


def export_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "export", "--max-batch", MAX_BATCH, *args]


NAMESPACE_REASON = can_unshare()


@pytest.mark.skipif(NAMESPACE_REASON is not None, reason=NAMESPACE_REASON or "")
def test_export_fills_a_mount_point_whose_parent_is_read_only(tiny_checkpoint, tmp_path):
    parent, volume = tmp_path / "cache", tmp_path / "volume"
    (parent / "vitae").mkdir(parents=True)
    volume.mkdir()
    out = parent / "vitae"
    first, again = export_cli("--checkpoint", str(tiny_checkpoint), "--out", str(out)), "--force"
    script = textwrap.dedent(
        f"""
        set -e
        mount --bind {parent} {parent}
        mount -o remount,bind,ro {parent}
        mount --bind {volume} {out}
        # the setup bites: the mount point cannot be renamed and its parent takes no new entry
        if mv {out} {parent}/moved 2>/dev/null; then echo "renamed the mount point"; exit 90; fi
        if mkdir {parent}/staging 2>/dev/null; then echo "wrote into the read-only parent"; exit 91; fi
        {" ".join(first)}
        {" ".join(first)} {again}
        ls -a {out}
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    # What the export wrote went into the volume, the folder under the mount point stayed empty.
    written = sorted(p.name for p in volume.iterdir())
    assert {"metadata.json", "model.onnx", "model.safetensors", "head.safetensors"} <= set(written)
    assert not any(name.startswith(STAGING_PREFIX) for name in written)
    assert list(out.iterdir()) == []


AUDIT_GUARD = """
import os, sys, tempfile
from pathlib import Path

out = Path(sys.argv[1]).resolve()
scratch = Path(tempfile.gettempdir()).resolve()  # libraries' own temporary files are not the export's business

def outside_or_out(path):
    path = Path(os.fsdecode(path)).resolve()
    if path == out or path.parent == out.parent:  # `out` itself, or a sibling: staging beside it
        return True
    return out not in path.parents and scratch not in path.parents

def guard(event, args):
    if event in ("os.rename", "os.rmdir", "os.remove", "shutil.rmtree", "os.mkdir"):
        paths, dir_fds = (args[:2], args[2:]) if event == "os.rename" else (args[:1], args[-1:])
        if any(fd is not None and fd != -1 for fd in dir_fds):
            return  # relative to a directory already opened (shutil.rmtree's walk), which was checked itself
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)) and outside_or_out(path):
                if event == "os.mkdir" and Path(os.fsdecode(path)).resolve() == out:
                    continue  # creating `out` itself when it is missing is fine
                raise PermissionError(f"{event} {os.fsdecode(path)}: out of bounds for an export into {out}")

sys.addaudithook(guard)
from export.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def guarded_export(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", AUDIT_GUARD, str(out), "--max-batch", MAX_BATCH, "--out", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_export_never_renames_removes_or_writes_beside_its_output_folder(tiny_checkpoint, tmp_path):
    out = tmp_path / "vitae"
    out.mkdir()
    for extra in ([], ["--force"]):
        run = guarded_export(out, "--checkpoint", str(tiny_checkpoint), *extra)
        assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "metadata.json").is_file() and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vitae"]
    assert not any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())


def test_the_guard_catches_an_export_that_stages_beside_its_output(tiny_checkpoint, tmp_path):
    # The guard must be able to fail: renaming `out` itself (what the old swap did) is refused.
    out = tmp_path / "vitae"
    out.mkdir()
    script = AUDIT_GUARD.replace("from export.__main__ import main", "os.rename(out, out.with_name('old'))")
    run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "out of bounds" in run.stderr
    assert out.is_dir()


def test_failed_export_leaves_the_previous_artifacts_and_no_staging(tiny_checkpoint, tmp_path):
    out = tmp_path / "vitae"
    export_artifacts(tiny_checkpoint, out, max_batch=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    run = guarded_export(out, "--checkpoint", str(broken), "--force")
    assert run.returncode == 1 and "export failed" in run.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_leftovers_of_a_killed_export_are_ignored_and_cleared(tiny_checkpoint, tmp_path):
    out = tmp_path / "vitae"
    leftover = out / f"{STAGING_PREFIX}killed"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half written")
    export_artifacts(tiny_checkpoint, out, max_batch=2)
    assert (out / "metadata.json").is_file() and not leftover.exists()
