"""One run writes a store at a time: the store's lock, and the errors about the output.

The lock is a file next to the store, ``STORE.lock`` (``photos.zarr.lock`` for
``photos.zarr``), holding its owner as JSON: host, process id, start time and command. The
owner also holds an exclusive ``flock`` on it, which the operating system releases when the
process ends in any way (SIGKILL included), and removes the file when it is done.

Taking the lock (:func:`store_lock`):

- no lock file, or one nobody holds that this host left behind (its process is gone: killed,
  crashed) -> taken, with a notice on stderr in the second case;
- held by a running process -> :class:`StoreLocked`, naming the process, its host, its start
  time and the lock file. Nothing was touched; run again when it is done (a finished job
  reruns as a no-op);
- left by **another host** -> :class:`StoreLocked` as well: this host cannot tell whether that
  run is still going. The message says to delete the lock file once it is not.

On a file system without ``flock`` the same decisions are made from the file's contents alone
(a same-host owner whose process id is gone is stale). A process may take a lock it already
holds again (nested ``with``): the command line takes it before loading the model and
:func:`~gradcam_jax.dataset.explain_dataset` inside.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "OutputError",
    "OutputNotWritable",
    "NotAStore",
    "OtherJob",
    "StoreLocked",
    "Owner",
    "lock_path",
    "store_lock",
]


class OutputError(Exception):
    """The output cannot be used as asked: not writable, locked by another run, not a store, or
    a store of another job. The command line exits with status 3."""


class OutputNotWritable(OutputError, PermissionError):
    """The output (or the folder it goes in) cannot be created or written."""


class NotAStore(OutputError, FileExistsError):
    """The output exists and is not a store: a file, or a folder with other contents."""


class OtherJob(OutputError, ValueError):
    """The store holds another job (other settings or files)."""


class StoreLocked(OutputError):
    """Another run holds the store's lock."""


def lock_path(store: str | os.PathLike) -> Path:
    """The lock file of ``store``: ``STORE.lock``, next to it."""
    path = Path(os.fspath(store)).absolute()
    return path.parent / f"{path.name}.lock"


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), to tell a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds (or held) a lock."""

    host: str
    pid: int
    started: str
    command: str = ""
    pid_start: str | None = None

    @classmethod
    def me(cls) -> Owner:
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        command = " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300]
        return cls(socket.gethostname(), os.getpid(), started, command, _process_start(os.getpid()))

    def describe(self) -> str:
        what = f" ({self.command})" if self.command else ""
        return f"process {self.pid} on {self.host}, started {self.started}{what}"

    def here(self) -> bool:
        return self.host == socket.gethostname()

    def running(self) -> bool:
        """Whether the owner still runs (only answerable on its own host)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, another user's
            pass
        now = _process_start(self.pid)
        return self.pid_start is None or now is None or now == self.pid_start


def _read_owner(fd: int) -> Owner | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
        return Owner(
            str(data["host"]),
            int(data["pid"]),
            str(data.get("started", "?")),
            str(data.get("command", "")),
            data.get("pid_start"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _flock(fd: int) -> bool | None:
    """Try an exclusive ``flock``: True (held now), False (another process holds it), None
    (the file system does not support it)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP...
        return None


def _locked_message(store: Path, lock: Path, owner: Owner | None) -> str:
    who = owner.describe() if owner else "another process"
    return (
        f"the store {str(store)!r} is in use by {who} (lock file {str(lock)!r}). Wait for that run "
        f"to finish and run again (a finished job reruns as a no-op), or choose another output."
    )


def _foreign_message(store: Path, lock: Path, owner: Owner) -> str:
    return (
        f"the store {str(store)!r} is locked by {owner.describe()}; this host cannot tell whether "
        f"that run is still going. If it is not, delete the lock file {str(lock)!r} and run again."
    )


def _decide(store: Path, lock: Path, locked: bool | None, owner: Owner | None) -> str | None:
    """Whether a lock file we could open may be taken: None (yes) or the refusal's message."""
    if locked is False:
        return _locked_message(store, lock, owner)
    if owner is None or (owner.pid == os.getpid() and owner.here()):
        return None
    if not owner.here():
        return _foreign_message(store, lock, owner)
    if locked is None and owner.running():  # no flock to tell: trust the pid
        return _locked_message(store, lock, owner)
    return None


def _open_lock(store: Path, lock: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputNotWritable(
            f"cannot write the output {str(store)!r}: {e.strerror or e} ({e.filename or lock})."
        ) from None


def _same_file(fd: int, lock: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(lock))
    except OSError:
        return False


def _acquire(store: Path, show: bool) -> int:
    """Take the lock (see the module); -> the open, locked file descriptor."""
    lock = lock_path(store)
    while True:
        fd = _open_lock(store, lock)
        locked = _flock(fd)
        if locked and not _same_file(fd, lock):  # its owner removed it as we opened it: again
            os.close(fd)
            continue
        owner = _read_owner(fd)
        refusal = _decide(store, lock, locked, owner)
        if refusal is not None:
            os.close(fd)
            raise StoreLocked(refusal)
        break
    if owner is not None and owner.pid != os.getpid() and show:
        state = "no longer running" if not owner.running() else "which no longer holds it"
        print(
            f"gradcam_jax: taking over the lock {str(lock)!r} left by {owner.describe()}, {state}.",
            file=sys.stderr,
            flush=True,
        )
    me = Owner.me()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(dataclasses.asdict(me), indent=1) + "\n").encode("utf-8"))
    with contextlib.suppress(OSError):
        os.fsync(fd)
    return fd


def _release(store: Path, fd: int) -> None:
    """Remove the lock file (still holding its flock, so no one takes the old file), then close."""
    with contextlib.suppress(OSError):
        if _same_file(fd, lock_path(store)):
            os.unlink(lock_path(store))
    os.close(fd)


#: The locks this process holds: store -> [file descriptor, depth, holding thread].
_HELD: dict[Path, list[int]] = {}
_HELD_GUARD = threading.Lock()


def _nested(path: Path) -> bool:
    """Whether this thread holds ``path``'s lock already (then one level deeper); another thread
    of this process holding it is refused like another process."""
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is None:
            return False
        if held[2] != threading.get_ident():
            raise StoreLocked(_locked_message(path, lock_path(path), Owner.me()) + " (another thread)")
        held[1] += 1
        return True


@contextlib.contextmanager
def store_lock(store: str | os.PathLike, *, show: bool = True) -> Iterator[Path]:
    """Hold the lock of ``store`` for the ``with`` block (see the module) -> the lock file.

    Raises:
      StoreLocked: another run holds it (or another host left it).
      OutputNotWritable: the lock file cannot be created (the output's folder is not writable).
    """
    path = Path(os.fspath(store)).absolute()
    if _nested(path):
        try:
            yield lock_path(path)
        finally:
            with _HELD_GUARD:
                _HELD[path][1] -= 1
        return
    fd = _acquire(path, show)
    with _HELD_GUARD:
        _HELD[path] = [fd, 1, threading.get_ident()]
    try:
        yield lock_path(path)
    finally:
        with _HELD_GUARD:
            del _HELD[path]
        _release(path, fd)
