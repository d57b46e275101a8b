"""Storage faults in one line: which path, what happened, what to do.

`describe_os_error` turns any OSError into that line. `diagnose_write_failure` finds out what
went wrong when a library swallowed the errno (DCP's writer turns ENOSPC into "unexpected pos
704 vs 598" from torch's zip writer): the OSError in the exception chain if there is one, else
the filesystem's own state (read-only flag, free space) from statvfs.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

__all__ = ["ADVICE", "describe_os_error", "diagnose_write_failure", "os_error_in", "with_path"]

ADVICE: dict[int, str] = {
    errno.ENOSPC: "no space left on the device: free space there, or write somewhere else",
    errno.EDQUOT: "disk quota exceeded: free space in your quota, or write somewhere else",
    errno.EROFS: "the filesystem is read-only: choose a writable location",
    errno.EACCES: "permission denied: check the owner and mode of the path, or choose another location",
    errno.EPERM: "operation not permitted: check the owner and mode of the path, or choose another location",
    errno.EIO: "input/output error: the storage under it failed (see dmesg); check the disk or network "
               "filesystem, then retry",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory where a file was expected",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "directory not empty",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.ENFILE: "too many open files on this machine",
    errno.EXDEV: "cannot move across filesystems: move it yourself, or choose a path on the same filesystem",
    errno.EBUSY: "busy (a mount point, or in use): choose another path",
    errno.ELOOP: "too many levels of symbolic links",
}


def no_such_path(path: Path | str) -> FileNotFoundError:
    """The error for an input path that is not there, as a failed open would raise it (errno and
    path set), so `describe_os_error` names the path: "<path>: no such file or directory"."""
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))


def with_path(e: OSError, path: Path | str, temp: Path | None = None) -> OSError:
    """`e` with `path` as its filename when it has none, or names the temp path `temp` (or a file
    inside it) that the user never asked for. Same errno, so the same OSError subclass."""
    named = e.filename is not None and not (temp is not None and str(e.filename).startswith(str(temp)))
    if named or not e.errno:
        return e
    return OSError(e.errno, os.strerror(e.errno), str(path))


_OS_ERROR_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]")


def os_error_in(exc: BaseException, path: Path | str) -> OSError | None:
    """The OSError behind `exc` (itself, its cause/context chain, or an errno quoted in the message
    of a library that wraps it, like safetensors' "(os error 28)"), named `path`; None if none."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return with_path(e, path)
        m = _OS_ERROR_TEXT.search(str(e))
        if m:
            code = int(m.group(1) or m.group(2))
            return OSError(code, os.strerror(code), str(path))
        e = e.__cause__ or e.__context__
    return None


_FULL_BELOW = 1 << 20  # bytes free under which a failed write is put down to a full disk


def describe_os_error(e: OSError, fallback_path: Path | str | None = None) -> str:
    """'<path>: <what happened and what to do>' (the path from the error, else `fallback_path`)."""
    path = e.filename if e.filename is not None else fallback_path
    what = ADVICE.get(e.errno or 0, e.strerror or str(e) or e.__class__.__name__)
    where = f"{path}" if path is not None else "(path unknown)"
    if e.filename2 is not None:
        where += f" -> {e.filename2}"
    return f"{where}: {what}"


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def diagnose_write_failure(exc: BaseException, path: Path | str) -> OSError | None:
    """The OSError that made writing `path` fail: found in `exc`, or inferred from the filesystem
    (read-only -> EROFS, under 1 MiB free -> ENOSPC); None when neither explains it."""
    found = os_error_in(exc, path)
    if found is not None:
        return found
    try:
        st = os.statvfs(_existing(Path(path)))
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    if st.f_bavail * st.f_frsize < _FULL_BELOW:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None
