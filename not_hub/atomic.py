"""Replacing a checkpoint folder atomically: a crash leaves the old folder or the new one, never a mix.

A checkpoint is several files that only make sense together (the config records each tensor's sha256; the weights
record the config's sha256). Renaming them into place one by one leaves a window in which a kill gives new config
beside old weights, and the previous good checkpoint no longer loads. Instead the new checkpoint is written
completely into a sibling folder, and the two folders are swapped in one `renameat2(RENAME_EXCHANGE)` call (Linux).
Where that call does not exist, the old folder is renamed aside, the new one renamed in, and the old one deleted:
a crash between the two renames leaves the previous checkpoint whole under `.<name>.not_hub-old-<pid>-*`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

_TMP_TAG = ".not_hub-new-"
_OLD_TAG = ".not_hub-old-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

try:
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # not Linux/glibc
    _renameat2 = None


def exchange_paths(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the platform cannot (then nothing was changed)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without RENAME_EXCHANGE
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc (Linux); None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_gone(pid: int, leftover: Path) -> bool:
    """The process that wrote `leftover` no longer runs: its pid is free, or was reused by a process started after
    the leftover was made (a pid reused by a later process would otherwise keep the leftover forever)."""
    if pid == os.getpid():
        return False
    if not _pid_alive(pid):
        return True
    started = _process_start(pid)
    try:
        return started is not None and started > leftover.stat().st_mtime + 1.0
    except OSError:
        return False


def _remove_stale(target: Path) -> None:
    """Delete leftovers of earlier saves to `target` that were killed mid-way (their process is gone)."""
    for tag in (_TMP_TAG, _OLD_TAG):
        for leftover in target.parent.glob(f".{target.name}{tag}*"):
            pid = leftover.name[len(f".{target.name}{tag}") :].partition("-")[0]
            if pid.isdigit() and _writer_gone(int(pid), leftover):
                shutil.rmtree(leftover, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_folder(target: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Make `target` the folder `write(folder)` fills, in one atomic step.

    Files of an existing `target` that `write` does not produce (a hand-written card, notes) are carried over
    (hard links, so nothing is copied). If `write` raises, `target` is untouched and the partial folder removed.
    """
    target = Path(target)
    if target.is_symlink():
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    new = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_TMP_TAG}{os.getpid()}-"))
    try:
        write(new)
        umask = os.umask(0)
        os.umask(umask)
        for path in new.iterdir():
            os.chmod(path, 0o666 & ~umask)  # temp files are private; checkpoints are ordinary files
        if not target.exists():
            os.chmod(new, 0o777 & ~umask)
            os.replace(new, target)  # atomic: the folder appears whole
            return
        os.chmod(new, target.stat().st_mode & 0o7777)
        for path in target.iterdir():
            if not (new / path.name).exists():
                if path.is_dir() and not path.is_symlink():
                    shutil.copytree(path, new / path.name, symlinks=True, copy_function=_link_or_copy)
                else:
                    _link_or_copy(str(path), str(new / path.name))
        if exchange_paths(new, target):
            return  # `new` now holds the previous folder; removed below
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{_OLD_TAG}{os.getpid()}-"))
        os.rmdir(old)
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)  # put the previous folder back before reporting the error
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(new, ignore_errors=True)


_OS_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a parent of the path is a file, not a folder",
    errno.EEXIST: "the path exists and is not a folder",
    errno.ENAMETOOLONG: "the path is too long",
}


def describe_os_error(err: BaseException) -> str:
    """One line for a failed write: the cause in words (disk full, read-only, ...) and the path it names."""
    code = getattr(err, "errno", None)
    if code is None and "No space left" in str(err):  # safetensors' own error carries only the text
        code = errno.ENOSPC
    cause = _OS_CAUSES.get(code) or (getattr(err, "strerror", None) or str(err).splitlines()[0][:160])
    where = getattr(err, "filename", None)
    return f"{cause}{f' ({where})' if where else ''}"
