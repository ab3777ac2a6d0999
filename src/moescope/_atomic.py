"""Atomic outputs: write beside the target, then rename into place; inputs are never touched.

A crash, a bad input, Ctrl-C or ``kill -9`` leaves either the old target or the complete new one, never half
a file and never neither, and the next run that writes (or reads, where wired) the target cleans up after it.

    >>> with atomic_path("out.npz", overwrite=False, suffix=".npz", inputs=[src]) as tmp:
    ...     np.savez(tmp, ...)            # tmp is in the same folder; renamed to out.npz on success

Hidden names beside a target ``NAME`` (in its folder, so every rename stays on one file system)::

    .NAME.tmp-PID-RAND[.SUFFIX]   the new output being written by process PID
    .NAME.old-PID-RAND            the old output a folder replace moved aside (only where the file system
                                  cannot swap two paths in one step; Linux can, see `replace_into`)
    .NAME.del-PID-RAND            an old output being deleted

`recover` (run by `check_output`, so by every writer before it starts, on its output and its inputs) deletes
those whose process is no longer alive, and first renames a ``.old-`` back to ``NAME`` when the replace that
moved it aside died before the new output arrived. A live process's names are never touched. Owners are told
apart by process id on this machine, so two machines writing one target in a shared network folder are not.

What an existing output may be (`check_output`): a file (replaced with ``--overwrite``), an empty folder, or a
folder moescope wrote of the kind being written (`FOLDER_KINDS`: a trace store, a split output, ESFT logs;
replaced whole with ``--overwrite``). Any other folder is refused, and so is an output that is an input, lies
inside an input folder or holds an input.

Does not: lock a target against two live writers (the last rename wins), or fsync (a power cut may lose the
newest rename; a killed process never does).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from moescope.errors import MoescopeError, OutputExistsError, UsageError

_log = logging.getLogger(__name__)

# what is written: a file, or a folder of one of `FOLDER_KINDS`
FILE = "file"
TRACE_STORE = "trace store"
SPLIT_OUTPUT = "split output"
ESFT_LOGS = "ESFT log folder"
EMPTY = "empty folder"  # what `folder_kind` says of a folder with nothing in it

# the marks of moescope's folders (tests/test_atomic.py checks them against store.py, gguf/split.py, imports/esft.py)
STORE_ATTR, STORE_FORMAT = "moescope", "moescope.trace"  # zarr.json: attributes[STORE_ATTR]["format"]
STORE_LOCK = ".{name}.lock"  # a store writer's lock file beside the store, JSON with its pid and host
ZARR_PARTIAL = re.compile(r".+\.[0-9a-f]{32}\.partial")  # zarr's LocalStore writes NAME.UUID.partial, then renames
SPLIT_MANIFEST = "split.json"
ESFT_LAYER_FILE = re.compile(r"expert_weights_\d+\.txt")

_LEFTOVER = re.compile(r"(?P<tag>tmp|old|del)-(?P<pid>\d+)-[0-9a-f]{12}(?:\..*)?")  # after ".NAME."
_LEFTOVER_NAME = re.compile(r"\..+\.(?:tmp|old|del)-\d+-[0-9a-f]{12}(?:\..*)?")


# -- which folders moescope wrote -------------------------------------------------------------------------
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _store_writer(folder: Path) -> int | None:
    """The pid in the write lock beside `folder` (``.NAME.lock``, `store.WriterLock`) of a writer on this host."""
    lock = _json(folder.parent / STORE_LOCK.format(name=folder.name))
    ok = isinstance(lock, dict) and isinstance(lock.get("pid"), int) and lock.get("host") == socket.gethostname()
    return lock["pid"] if ok else None


def _dead_writers_stub(folder: Path, doc: Any) -> bool:
    """A store started but not yet carrying moescope's attributes (zarr.json missing or a bare group) beside the
    write lock of a moescope writer that is no longer alive (or is this process, which took the lock over): an
    in-place store (a capture) killed before its first commit."""
    pid = _store_writer(folder)
    if pid is None or (pid != os.getpid() and pid_alive(pid)):
        return False
    return doc is None or (isinstance(doc, dict) and doc.get("node_type") == "group")


def _is_trace_store(folder: Path, entries: list[os.DirEntry]) -> bool:
    """Only zarr's entries (zarr.json, array folders, a file being written), and zarr.json carries moescope's trace
    attributes, or the folder is a store whose writer died before its first commit."""
    if not all(
        e.name == "zarr.json" or e.is_dir(follow_symlinks=False) or ZARR_PARTIAL.fullmatch(e.name) for e in entries
    ):
        return False
    doc = _json(folder / "zarr.json")
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    mark = attrs.get(STORE_ATTR) if isinstance(attrs, dict) else None
    return (isinstance(mark, dict) and mark.get("format") == STORE_FORMAT) or _dead_writers_stub(folder, doc)


def _is_split_output(folder: Path, entries: list[os.DirEntry]) -> bool:
    """split.json lists the parts; the folder holds that manifest and those parts only."""
    doc = _json(folder / SPLIT_MANIFEST)
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list):
        return False
    parts = {g.get("file") for g in groups if isinstance(g, dict)}
    return all(e.name == SPLIT_MANIFEST or (e.name in parts and e.is_file(follow_symlinks=False)) for e in entries)


def _is_esft_logs(folder: Path, entries: list[os.DirEntry]) -> bool:
    """Only ESFT layer files (expert_weights_<layer>.txt), at the top or in task folders holding only them."""

    def layer_file(e: os.DirEntry) -> bool:
        return bool(ESFT_LAYER_FILE.fullmatch(e.name)) and e.is_file(follow_symlinks=False)

    for e in entries:
        if layer_file(e):
            continue
        if not e.is_dir(follow_symlinks=False):
            return False
        with os.scandir(e.path) as it:
            inner = list(it)
        if not inner or not all(layer_file(x) for x in inner):
            return False
    return True


FOLDER_KINDS: dict[str, Callable[[Path, list[os.DirEntry]], bool]] = {
    TRACE_STORE: _is_trace_store,
    SPLIT_OUTPUT: _is_split_output,
    ESFT_LOGS: _is_esft_logs,
}


def _entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return list(it)


def folder_kind(path: str | os.PathLike) -> str | None:
    """What the folder `path` is: `EMPTY`, the `FOLDER_KINDS` name of a moescope output, or None (not moescope's)."""
    entries = _entries(Path(path))
    if not entries:
        return EMPTY
    return next((name for name, test in FOLDER_KINDS.items() if test(Path(path), entries)), None)


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _check_existing(path: Path, kind: str | None, overwrite: bool) -> None:
    """Refuse to replace the existing `path` unless it is a file or a folder `kind` may replace (and `overwrite`).

    `kind` is what will be written there: `FILE`, a `FOLDER_KINDS` name, or None (any of them). An empty folder
    takes a folder without `overwrite` (nothing is lost); a symlink counts as a file (the link is replaced, not
    what it points to).
    """
    if _real_dir(path):
        have = folder_kind(path)
        if have == EMPTY and kind != FILE:
            return
        n = len(_entries(path))
        if kind == FILE:
            raise OutputExistsError(
                f"output {str(path)!r} is a folder ({n} entries) but this writes a file; pass a file path (a new "
                f"name, or a name inside that folder)"
            )
        writer = _store_writer(path)
        if have is None and writer is not None and writer != os.getpid() and pid_alive(writer):
            raise OutputExistsError(
                f"output {str(path)!r} is being written by process {writer}; wait for it to finish or write elsewhere"
            )
        if have is None:
            raise OutputExistsError(
                f"output {str(path)!r} is a folder that moescope did not write ({n} entries); pass a file path or "
                f"an empty/new folder"
            )
        if kind is not None and have != kind:
            raise OutputExistsError(
                f"output {str(path)!r} is a moescope {have}, not a {kind}; pass another path (or delete that folder "
                f"yourself if it should go)"
            )
    if not overwrite:
        raise OutputExistsError(
            f"output {str(path)!r} already exists; pass --overwrite to replace it or pick another path"
        )


# -- inputs -----------------------------------------------------------------------------------------------
def _is_url(path: Any) -> bool:
    return isinstance(path, str) and "://" in path


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output that is one of `inputs`, lies inside an input folder, or holds an input.

    Paths are compared after resolving links (an output that links to an input is that input) and by file
    identity (hard links). None entries and URLs in `inputs` are skipped.
    """
    out = Path(path).resolve()
    for src in inputs:
        if src is None or _is_url(src):
            continue
        s = Path(src).resolve()
        same = out == s
        if not same:
            with contextlib.suppress(OSError):
                same = os.path.samefile(path, src)
        if same:
            how = "" if Path(path).absolute() == Path(src).absolute() else " (the same file once links are followed)"
            raise UsageError(f"output {str(path)!r} is the input {str(src)!r}{how}; write the output to another path")
        if s in out.parents:
            raise UsageError(
                f"output {str(path)!r} is inside the input folder {str(src)!r}; write the output outside it"
            )
        if out in s.parents:
            raise UsageError(
                f"output {str(path)!r} holds the input {str(src)!r}, so replacing it would delete the input; pick "
                f"another output path"
            )


# -- leftovers of killed writers --------------------------------------------------------------------------
def temp_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A fresh hidden name beside `path` naming this process, ``.NAME.TAG-PID-RAND`` (same folder, so the final
    rename is atomic; the PID lets `recover` tell a dead writer's leftovers from a live one's)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists (a zombie, another user's process or an unknown answer: alive)."""
    if pid == os.getpid() or os.name != "posix":  # elsewhere os.kill(pid, 0) is no probe: keep everything
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False  # no such pid can exist
    except OSError:
        return True
    return True


def leftovers(path: str | os.PathLike) -> list[tuple[Path, str, int]]:
    """The `temp_sibling` names of `path` that exist: ``(sibling, tag, owner pid)``, live owners included."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:  # the folder is missing or unreadable: nothing to clean
        return []
    out = []
    for name in names:
        m = _LEFTOVER.fullmatch(name, len(prefix)) if name.startswith(prefix) else None
        if m:
            out.append((path.parent / name, m["tag"], int(m["pid"])))
    return out


def _ctime(path: Path) -> float:
    try:
        return os.lstat(path).st_ctime
    except OSError:
        return 0.0


def _recover_one(target: Path) -> list[str]:
    dead = [(p, tag) for p, tag, pid in leftovers(target) if not pid_alive(pid)]
    done: list[str] = []
    olds = sorted((p for p, tag in dead if tag == "old"), key=_ctime)
    if olds and _unfinished_store(target):
        # an in-place store writer (a capture) replacing an old store died before it completed: the old one
        # is what stays (a replace leaves the old output or the complete new one)
        remove(target)
        done.append(f"removed the unfinished store {target} of a writer that died; its old version comes back")
        _log.warning(done[-1])
    if olds and not os.path.lexists(target):
        try:  # the replace that moved the old output aside died before the new one arrived: put it back
            os.rename(olds[-1], target)
        except OSError as exc:  # someone else recovered it or wrote the target meanwhile
            _log.debug("could not restore %s from %s: %s", target, olds[-1].name, exc)
        else:
            done.append(f"restored {target} from {olds[-1].name} (a replace had been interrupted)")
            _log.warning(done[-1])
            dead = [(p, tag) for p, tag in dead if p != olds[-1]]
    for p, _tag in dead:
        remove(p)
        done.append(f"removed {p} (left by a writer that died)")
        _log.info(done[-1])
    return done


def _unfinished_store(target: Path) -> bool:
    """`target` is a trace store not marked complete whose writer (the lock beside it) is not running."""
    if not _real_dir(target):
        return False
    doc = _json(target / "zarr.json")
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    mine = attrs.get("moescope") if isinstance(attrs, dict) else None
    if not isinstance(mine, dict):  # no moescope attributes yet: a store killed before its first commit?
        return _dead_writers_stub(target, doc)
    if mine.get("complete") is not False:
        return False
    meta = mine.get("meta")
    extra = meta.get("extra") if isinstance(meta, dict) else None
    if isinstance(extra, dict) and extra.get("incomplete"):
        return False  # written whole from an incomplete store: complete as an output, only marked
    writer = _store_writer(target)
    return writer is None or (writer != os.getpid() and not pid_alive(writer))


def recover(path: str | os.PathLike) -> list[str]:
    """Clean up after writers of `path` that died: put back an old output a killed replace had moved aside
    (when `path` is missing), then delete the dead writers' temporaries. Live writers' names are kept.

    A missing `path` whose folder is missing too is recovered from the top (a split part inside a split
    output folder that a replace had moved aside comes back with its folder). Cheap when there is nothing to
    do: one listing of the folder. Returns one line per action taken (also logged).
    """
    p = Path(path)
    missing = []
    a = p
    while not os.path.lexists(a) and a.parent != a:
        missing.append(a)
        a = a.parent
    done: list[str] = []
    for target in reversed(missing) if missing else [p]:
        done += _recover_one(target)
    return done


def remove(path: str | os.PathLike) -> None:
    """Delete a file or folder if it exists. A folder under its own name is first renamed to a
    ``.NAME.del-PID-...`` sibling, so a kill half-way leaves a leftover `recover` deletes, never a half-deleted
    folder under the output's name."""
    path = Path(path)
    if _real_dir(path):
        if not _LEFTOVER_NAME.fullmatch(path.name):
            aside = temp_sibling(path, "del")
            try:
                os.rename(path, aside)
                path = aside
            except OSError as exc:  # e.g. no write permission on the parent: delete in place
                _log.debug("deleting %s in place: %s", path, exc)
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- committing -------------------------------------------------------------------------------------------
@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (Linux 3.15+, glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # this file system cannot swap
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_into(tmp: str | os.PathLike, path: str | os.PathLike, overwrite: bool) -> None:
    """Move finished `tmp` (file or folder) to `path` so that readers see the old output or the new, never neither.

    An existing `path` is replaced only as `check_output` allows (with `overwrite`; a folder only by a folder of
    its kind); otherwise `tmp` is deleted and the refusal raised. A file goes in with one `os.replace`. A folder
    (or anything replacing a folder) is swapped in one step where the file system can (Linux renameat2), else
    old -> ``.NAME.old-PID-...``, new -> NAME, then the old is deleted; a kill between those two renames is
    undone by the next `recover`.
    """
    tmp, path = Path(tmp), Path(path)
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    want = (folder_kind(tmp) or "folder of no known kind") if _real_dir(tmp) else FILE
    try:
        _check_existing(path, want, overwrite)
    except MoescopeError:
        remove(tmp)
        raise
    if not (_real_dir(tmp) or _real_dir(path)):
        os.replace(tmp, path)
        return
    if _real_dir(path) and folder_kind(path) == EMPTY:
        os.replace(tmp, path)  # a folder renames over an empty folder in one step
        return
    if _exchange(tmp, path):
        remove(tmp)  # now the old output
        return
    old = temp_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    remove(old)


def check_output(
    path: str | os.PathLike,
    overwrite: bool,
    *,
    kind: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Fail early (before any work) when writing `path` would destroy something or cannot work.

    Parameters
    ----------
    path : the output file or folder.
    overwrite : whether an existing output may be replaced (``--overwrite``).
    kind : what will be written: `FILE`, a `FOLDER_KINDS` name, or None (not known yet: any of them; the
        commit in `replace_into` then checks the kind written).
    inputs : the command's input paths (None entries and URLs skipped); `path` may not be one of them, lie
        inside one or hold one (`check_not_input`).

    Returns
    -------
    `path` as a `Path`. The output and every input are `recover`ed first (dead writers' leftovers deleted, an
    old output that a killed replace had moved aside put back).
    """
    assert kind is None or kind == FILE or kind in FOLDER_KINDS, kind
    p = Path(path)
    if p.name in ("", ".", ".."):
        raise UsageError(f"output {str(p)!r} names a folder by '.', '..' or '/'; pass a file path or a new folder name")
    inputs = [x for x in inputs if x is not None and not _is_url(x)]
    for src in inputs:
        recover(src)
    check_not_input(p, inputs)
    if not p.parent.is_dir():
        raise UsageError(f"output folder {str(p.parent)!r} does not exist; create it first")
    recover(p)
    if os.path.lexists(p):
        _check_existing(p, kind, overwrite)
    return p


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike,
    overwrite: bool = False,
    suffix: str = "",
    *,
    kind: str | None = None,
    inputs: Iterable[str | os.PathLike | None] = (),
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place (`replace_into`), on error delete it.

    `suffix` is appended to the temporary name for writers that insist on an extension (``np.savez``); it means
    a file is written (`kind` `FILE`) unless `kind` says otherwise. `kind` and `inputs` as in `check_output`.
    """
    target = check_output(path, overwrite, kind=kind or (FILE if suffix else None), inputs=inputs)
    tmp = temp_sibling(target)
    if suffix:
        tmp = tmp.with_name(tmp.name + suffix)
    try:
        yield tmp
    except BaseException:
        remove(tmp)
        raise
    replace_into(tmp, target, overwrite)


def write_text_atomic(
    path: str | os.PathLike, text: str, overwrite: bool = False, *, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Write `text` to the file `path` atomically (UTF-8)."""
    with atomic_path(path, overwrite, kind=FILE, inputs=inputs) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
