"""Crash-safe writes: build beside the target, flush to disk, then rename into place.

A reader (or a crash) sees either the previous complete version or the new complete one, never a
half-written file or directory. Everything is created as a plain ``mkdir`` / ``open`` would create
it, so the user's umask decides the permissions.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ``root``, then every directory, to disk."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(dirpath)


def sibling_dir(target: str | Path, tag: str) -> Path:
    """Create a new empty hidden directory ``.{name}.{tag}-XXXXXXXX`` beside ``target`` with the
    mode a plain ``mkdir`` gives (``tempfile.mkdtemp`` would make it private, 0700)."""
    target = Path(target)
    for _ in range(100):
        path = target.with_name(f".{target.name}.{tag}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue
    raise FileExistsError(f"could not create a temporary directory beside {target}")  # pragma: no cover


def match_plain_modes(root: str | Path) -> None:
    """Give every file and directory under ``root`` the permissions a plain ``open`` / ``mkdir``
    would have given it here (libraries such as safetensors write 0600 files)."""
    root = Path(root)
    probe = root / f".mode-probe-{secrets.token_hex(4)}"
    probe.touch()
    file_mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    dir_mode = stat.S_IMODE(root.stat().st_mode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def replace_dir(src: str | Path, target: str | Path) -> None:
    """Rename directory ``src`` onto ``target``. An existing ``target`` is first renamed aside and
    removed only once ``src`` is in place, so a crash leaves the old or the new version (the old
    one possibly under ``.{name}.old-XXXXXXXX``), never a mixture."""
    src, target = Path(src), Path(target)
    old = None
    if target.exists() or target.is_symlink():
        old = sibling_dir(target, "old")
        os.rmdir(old)  # only the unique name is wanted: rename needs a free (or empty) destination
        os.replace(target, old)
    try:
        os.replace(src, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a new empty directory beside ``target`` to write into. When the block ends without an
    error its files get the modes plain ``open`` / ``mkdir`` give, are flushed to disk, and the
    directory is renamed onto ``target`` (replacing it, see :func:`replace_dir`). On any error,
    interrupts included, the temporary directory is removed and ``target`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_dir(target, "tmp")
    try:
        yield tmp
        match_plain_modes(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_write(target: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Yield a file open for writing beside ``target`` (in the same directory, so the final rename
    never crosses filesystems the way a file in ``$TMPDIR`` would). When the block ends without an
    error the file is flushed to disk and renamed onto ``target``; on any error, interrupts
    included, it is removed and ``target`` is left as it was. A process killed mid-write leaves
    ``target`` intact plus a hidden ``.{name}.tmp-XXXXXXXX`` beside it. The file gets the mode a
    plain ``open`` gives (the umask decides)."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}")
    fh = open(tmp, mode.replace("w", "x"))  # a new file (O_EXCL), mode 0666 less the umask
    try:
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def stale_temps(target: str | Path) -> list[Path]:
    """Leftovers of :func:`atomic_write` calls for ``target`` that never finished (a killed process)."""
    target = Path(target)
    return sorted(target.parent.glob(f".{target.name}.tmp-*"))


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive inter-process lock on the file ``path`` (POSIX ``flock``; no-op elsewhere, where
    the atomic renames alone keep a cache whole): a second process building the same cache entry
    waits, then finds it built."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
