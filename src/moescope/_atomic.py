"""Atomic outputs: write beside the target, then rename into place; inputs are never touched.

A crash, a bad input or Ctrl-C leaves either the old target or nothing, never half a file.

    >>> with atomic_path("out.npz", overwrite=False) as tmp:
    ...     np.savez(tmp, ...)            # tmp is in the same folder; renamed to out.npz on success
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from moescope.errors import OutputExistsError, UsageError


def check_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any work) when `path` exists and `overwrite` is off, or its folder is missing."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(
            f"output {str(p)!r} already exists; pass --overwrite to replace it or pick another path"
        )
    if not p.parent.is_dir():
        raise UsageError(f"output folder {str(p.parent)!r} does not exist; create it first")
    return p


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A fresh hidden name in the same folder as `path` (so the final rename is atomic)."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}"


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def replace_into(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move finished `tmp` (file or folder) to `path`; an existing `path` is replaced only with `overwrite`."""
    if path.exists():
        if not overwrite:
            remove(tmp)
            raise OutputExistsError(f"output {str(path)!r} appeared while writing; pass --overwrite to replace it")
        if tmp.is_dir() or path.is_dir():
            # os.replace cannot swap a folder over a non-empty folder: move the old one aside first
            old = temp_sibling(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
            remove(old)
            return
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place, on error delete it.

    `suffix` is appended to the temporary name for writers that insist on an extension (``np.savez``).
    """
    target = check_output(path, overwrite)
    tmp = temp_sibling(target)
    if suffix:
        tmp = tmp.with_name(tmp.name + suffix)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    replace_into(tmp, target, overwrite)


def write_text_atomic(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write `text` to `path` atomically (UTF-8)."""
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
