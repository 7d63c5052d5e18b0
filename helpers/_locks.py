"""Inter-process locks for the course's writers (plumbing for helpers/finetune.py).

A lock is an ``fcntl.flock`` on a file in ``<course home>/locks`` (a folder only this user can enter), named
by a hash of what it protects; the OS frees it when the process dies. The file is opened with ``O_NOFOLLOW``
and never truncated, so a symlink planted at its name is refused rather than followed, and it is removed
when the lock is released (a killed process's file, at the next lock taken): no lock files pile up.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path

from helpers.config import TutorialError, home_dir


def lock_dir() -> Path:
    folder = home_dir() / "locks"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def remove_stale(folder: Path) -> None:
    """Remove the lock files no live process holds (left by a killed process)."""
    for path in folder.glob("*.lock"):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Held by us now, but the name may already belong to a newer file that a live holder made after
            # the file we opened was released and removed: remove the name only while it is still ours.
            if _same_file(path, fd):
                path.unlink()
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (only the flock holder of that file removes it)."""
    try:
        current = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (current.st_ino, current.st_dev) == (held.st_ino, held.st_dev)


class FileLock:
    """A held lock; ``release()`` (or leaving a ``with`` block) removes its file, then frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still held: a process waiting on this file sees it is gone and retries
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    close = release

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def acquire(target: str | Path, *, kind: str = "write", wait: bool = True) -> FileLock | None:
    """The lock named after ``kind`` and ``target``; waits for it, or with ``wait=False`` returns None at once
    when another live process holds it."""
    key = hashlib.sha1(f"{kind}:{Path(target).resolve()}".encode()).hexdigest()[:16]
    folder = lock_dir()
    remove_stale(folder)
    path = folder / f"{key}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            raise TutorialError("lock.symlink",
                f"锁文件 {path} 是一个符号链接，不是本课程创建的文件。为了安全没有打开它；请检查后删除它再重试。",
                f"The lock file {path} is a symbolic link the course did not make. It was not opened, for safety; "
                "check it, delete it and try again.", path=str(path)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(path, fd):
            return FileLock(path, fd)
        os.close(fd)  # the holder removed this file as it released it: take the lock on the new one


_CLAIMS: dict[str, object] = {}  # checkpoint folders this process trains into (lock held while it lives)


def lock(target: Path, *, kind: str = "write"):
    """A "write" lock on ``target`` waits; a "run" lock is taken at once or not at all (None)."""
    return acquire(target, kind=kind, wait=kind != "run")


def claim(ckpt_dir: Path) -> bool:
    """Reserve ``ckpt_dir`` for this process's training; False if another live process holds it."""
    key = str(ckpt_dir.resolve())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or key in _CLAIMS:  # torchrun: the ranks share one run
        return True
    fh = lock(ckpt_dir, kind="run")
    if fh is not None:
        _CLAIMS[key] = fh
    return fh is not None
