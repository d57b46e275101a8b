"""The one way lmforge writes files and directories: into a temp name beside the target, fsync,
rename.

Why: a crash, a kill or a full disk at any moment then leaves either the old content or the
complete new one under the final name, never half a file. And a failed `write()` carries no file
name of its own (ENOSPC reports only "No space left on device"), so errors raised here are given
the path being written: the CLI can then say *where* the disk is full.

Temp names are `<name>.<random>.tmp` (unique: two writers never share one) and are created with
mode 0666/0777 filtered by the umask, like any ordinary file (no 0600 surprises on shared storage).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lmforge.storage.explain import diagnose_write_failure, os_error_in, with_path

__all__ = ["atomic_copy", "atomic_dir", "atomic_open", "as_if_created", "current_umask", "fsync_dir", "temp_sibling",
           "write_text_atomic"]


def temp_sibling(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh name in the same directory (same filesystem, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}{suffix}")


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; filesystems that cannot fsync a directory are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside `path` for writing ("w" or "wb"); when the block ends without an
    error, fsync it and rename it onto `path`; on any error remove it (the old `path` stays) and
    re-raise, an OSError with `path` as its filename."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode {mode!r}: must be 'w' or 'wb'")
    path = Path(path)
    tmp = temp_sibling(path)
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        created = True
        with open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        created = False
        fsync_dir(path.parent)
    except OSError as e:
        raise with_path(e, path, tmp) from e
    except RuntimeError as e:  # torch.save swallows ENOSPC into "unexpected pos N vs M": find it
        cause = diagnose_write_failure(e, path) if created else None
        if cause is not None:
            raise cause from e
        raise
    finally:
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink()


def current_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status; else set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: Path) -> Path:
    """Give `path` the mode an ordinary new file gets (0666 filtered by the umask): for files a
    library created 0600 (safetensors), which other users of a shared filesystem could not read."""
    os.chmod(path, 0o666 & ~current_umask())
    return Path(path)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy the file `src` to `dst` atomically (a reader never sees half of it)."""
    with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def atomic_dir(out_dir: Path, fill: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Create directory `out_dir` whole: `fill(tmp)` writes into a new temp directory beside it,
    which is then renamed into place, so readers never see half of it. An existing `out_dir` is
    replaced only when `replace` (the caller checked the no-clobber rules): it is moved aside
    first and deleted only once the new one is in place; if that rename fails it is moved back.
    Any error removes the temp directory; an OSError is raised naming `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not replace and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(errno.EEXIST, "already exists and is not empty", str(out_dir))
    tmp = temp_sibling(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp, 0o777)
        fill(tmp)
        old = None
        if out_dir.exists() or out_dir.is_symlink():
            old = temp_sibling(out_dir, ".old")
            os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, out_dir)
            raise
        fsync_dir(out_dir.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, OSError):
            named = os_error_in(e, out_dir)
            if named is not None:
                raise named from e
        if isinstance(e, OSError):
            raise with_path(e, out_dir, tmp) from e
        raise
    return out_dir
