"""The trace store's writer lock: one writer per store path (`WriterLock`, used by `moescope.store`).

The lock is the file ``.NAME.lock`` beside the store, created with ``O_CREAT | O_EXCL`` and holding the
writer's pid, host, start time and a token. A second writer fails with `UsageError` while the holder lives;
the lock of a dead process on this host is stale and taken over (one taker at a time, through a guard
file); a lock from another host is never taken over. Readers ignore the lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from moescope import _atomic
from moescope.errors import UsageError

log = logging.getLogger("moescope.store")
LOCK_WAIT_SECONDS = 2.0  # how long a writer retries a lock file it cannot read (one being written, or damaged)


def _short(value: Any, limit: int = 80) -> str:
    """`value` for a one-line message: its repr (an exception: its text), first line, at most `limit` chars."""
    text = str(value) if isinstance(value, BaseException) else repr(value)
    text = text.strip().splitlines()[0] if text.strip() else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------------
# one writer per store path


def _clock(t: float) -> str:
    """``14:02`` today, else ``2025-01-31 14:02`` (local time)."""
    fmt = "%H:%M" if time.localtime(t)[:3] == time.localtime()[:3] else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(t))


class _BadLock(ValueError):
    """A lock file whose content is not a lock record (being written this instant, or damaged)."""


@dataclasses.dataclass(frozen=True)
class WriterLock:
    """Who writes a store: the lock file ``.NAME.lock`` beside the store, made with O_CREAT|O_EXCL, holding
    the writer's pid, host, start time (unix seconds) and a random token (so only its taker releases it)."""

    file: Path
    pid: int
    host: str
    since: float
    token: str

    @staticmethod
    def file_for(store: Path) -> Path:
        return store.parent / _atomic.STORE_LOCK.format(name=store.name)

    @classmethod
    def _read(cls, file: Path) -> WriterLock | None:
        """The lock recorded in `file`; None when there is none; `_BadLock` when it is not a lock record."""
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise _BadLock(_short(exc)) from None
        ok = isinstance(d, dict) and _is_int(d.get("pid")) and d["pid"] > 0 and isinstance(d.get("host"), str)
        if not (ok and isinstance(d.get("since"), int | float) and isinstance(d.get("token"), str)):
            raise _BadLock(f"content {_short(d, 60)}")
        return cls(file, d["pid"], d["host"], float(d["since"]), d["token"])

    @property
    def live(self) -> bool:
        """Its process runs (or runs on another host, where this cannot be checked)."""
        return self.host != socket.gethostname() or _atomic.pid_alive(self.pid)

    @classmethod
    def holder(cls, store: Path) -> WriterLock | None:
        """The live writer of `store`, if any (for messages; readers never wait for it)."""
        try:
            held = cls._read(cls.file_for(store))
        except _BadLock:
            return None
        return held if held is not None and held.live else None

    @classmethod
    def clear_dead(cls, store: Path) -> bool:
        """Remove the lock of `store` left by a writer on this host that is no longer running (readers call this,
        so a killed writer's lock does not outlive the next run); True when one was removed."""
        try:
            held = cls._read(cls.file_for(store))
        except _BadLock:
            return False
        return held is not None and not held.live and held._break()

    def busy(self, store: Path) -> UsageError:
        """The error for another writer of `store` while this lock is live."""
        here = self.host == socket.gethostname()
        return UsageError(
            f"{store} is being written by process {self.pid}{'' if here else f' on host {self.host}'} (since "
            f"{_clock(self.since)}); wait for it to finish or write elsewhere"
            + ("" if here else f" (if that process is gone, delete {self.file})")
        )

    @classmethod
    def check_free(cls, store: str | os.PathLike) -> None:
        """Fail early (before loading a model or reading a large input) when a live writer holds `store`;
        `acquire` checks again when writing starts."""
        held = cls.holder(Path(store))
        if held is not None:
            raise held.busy(Path(store))

    @classmethod
    def acquire(cls, store: Path) -> WriterLock:
        """Take the lock of `store`: `UsageError` while a live process holds it; a dead one's is taken over."""
        file = cls.file_for(store)
        me = cls(file, os.getpid(), socket.gethostname(), time.time(), uuid.uuid4().hex)
        record = json.dumps({"pid": me.pid, "host": me.host, "since": me.since, "token": me.token})
        deadline, why = time.monotonic() + LOCK_WAIT_SECONDS, "other writers kept taking it"
        _atomic.recover(file)  # record files of writers killed before they linked them
        # the record is written whole to a temporary, then linked under the lock's name: a writer killed at any
        # moment leaves either no lock or a complete one (never an empty lock nobody could take over)
        tmp = _atomic.temp_sibling(file)
        try:
            tmp.write_text(record, encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"{store}: cannot create its lock file {file} ({exc.strerror}); make the folder writable or "
                f"write elsewhere"
            ) from None
        try:
            return cls._link(store, file, tmp, me, deadline, why)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def _link(cls, store: Path, file: Path, tmp: Path, me: WriterLock, deadline: float, why: str) -> WriterLock:
        """Link the written record `tmp` as the lock `file`, waiting out a lock being taken over (`acquire`)."""
        while time.monotonic() < deadline:
            try:
                os.link(tmp, file)
            except FileExistsError:
                try:
                    held = cls._read(file)
                except _BadLock as exc:  # a writer between creating the file and writing it, or damage
                    why = f"its content is unreadable ({exc})"
                else:
                    if held is not None and held.live:
                        raise held.busy(store) from None
                    if held is None or held._break():
                        continue  # gone: try again at once
                    why = "another writer is taking over a dead writer's lock"
                time.sleep(0.02)
                continue
            except OSError as exc:
                raise UsageError(
                    f"{store}: cannot create its lock file {file} ({exc.strerror}); make the folder writable or "
                    f"write elsewhere"
                ) from None
            return me
        raise UsageError(
            f"{store}: cannot take its write lock {file} ({why}); if no process is writing {store}, delete that "
            f"file, or write elsewhere"
        )

    def _break(self) -> bool:
        """Remove this stale lock; False when another writer is removing it right now. Removers take turns
        through the guard file ``.NAME.lock.break`` (one abandoned for 10 s is cleared), so none can delete a
        fresh lock that replaced the stale one: a fresh lock only appears once the stale one is gone."""
        guard = self.file.with_name(self.file.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError, ValueError):
                text = guard.read_text(encoding="ascii").strip()
                # the guard of a remover that died (its pid written in it), or one abandoned for 10 s
                if (text.isdigit() and not _atomic.pid_alive(int(text))) or time.time() - guard.stat().st_mtime > 10.0:
                    guard.unlink()
            return False
        except OSError as exc:
            raise UsageError(
                f"cannot remove the lock {self.file} of process {self.pid}, which is no longer running "
                f"({exc.strerror}); delete that file yourself, or write elsewhere"
            ) from None
        try:
            os.write(fd, str(os.getpid()).encode())
            with contextlib.suppress(_BadLock):
                current = self._read(self.file)
                if current is not None and current.token == self.token:
                    self.file.unlink()
                    log.info("removed the write lock of process %d on %s: it is no longer running", self.pid, self.file)
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        """Remove the lock file if it is still this lock (not from a forked child of the taker)."""
        if os.getpid() != self.pid:
            return
        with contextlib.suppress(_BadLock):
            held = self._read(self.file)
            if held is not None and held.token == self.token:
                self.file.unlink(missing_ok=True)
