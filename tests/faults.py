"""Faults as they happen, for the tests: a real small file system that fills up, and the processes of a run.

- `small_disk(folder, megabytes)`: a tmpfs of that size mounted on `folder` for the block, unmounted
  after; the test is skipped where mounting is not permitted (not root, no CAP_SYS_ADMIN).
- `fill(folder)`: write a filler file until the disk is really full (ENOSPC); returns it, so the
  test can delete it to "free some space".
- `children(pid)`: the live child process ids of `pid` (from /proc), to signal a worker directly.
- `floats(...)`: hypothesis' floats without subnormals: a trainer run in the same process
  (torch.set_flush_denormal) flushes them to zero, which hypothesis refuses to build floats under.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import strategies as st


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: float) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(folder)],
        capture_output=True, text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def grow(folder: Path, megabytes: float) -> None:
    """Make the tmpfs on `folder` larger (an administrator freeing space)."""
    subprocess.run(["mount", "-o", f"remount,size={int(megabytes * 1024)}k", str(folder)], check=True)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def floats(*args, **kwargs) -> st.SearchStrategy[float]:
    return st.floats(*args, allow_subnormal=False, **kwargs)
