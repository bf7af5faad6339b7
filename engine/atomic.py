"""Files the engine writes outside the run store: checked up front, written whole or not at all.

Contract:
- ``check_output_file(path, flag)`` raises before any work when `path` cannot receive a file:
  ``InputError`` (exit 2) when it names a folder, a dangling symbolic link, a name longer than the
  file system allows (ENAMETOOLONG) or lies under a regular file; ``ReadOnlyLocation`` (exit 5)
  when the nearest existing folder is not writable. It creates nothing. `flag` ("--out",
  "--csv") is how the message names the option.
- ``check_name_lengths(path, flag, reserve)``: the ENAMETOOLONG part alone, with `reserve`
  characters kept free for a temporary sibling name (exports use ``.<name>.partial-<pid>-<hex>``).
- ``write_atomic(path, data)`` (str or bytes) and ``open_atomic(path, mode)`` (a context manager
  for writers such as csv): the bytes go to a temporary file beside `path`
  (``.<name>.tmp-<pid>-<hex>``), are flushed and fsynced, then renamed over `path`. A kill or a
  full disk leaves the previous file (or none), never a truncated one; the temporary file is
  removed on any error, and temporary files of killed writers of the same path are removed
  before the next write (only names of that pattern whose pid is gone). OS failures become engine.errors environment errors naming `path`
  (disk full, read-only, permission denied); other exceptions pass through.
Written by hand: the standard library has no atomic replace-by-rename helper, and the small
packages that do (atomicwrites) are unmaintained.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import uuid
from pathlib import Path

from engine.errors import InputError, ReadOnlyLocation, from_exception

NAME_MAX_DEFAULT = 255  # bytes per path component on ext4, xfs, btrfs, tmpfs, APFS, NTFS


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return NAME_MAX_DEFAULT


def existing_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_name_lengths(path, flag: str, reserve: int = 0) -> None:
    """InputError when a component of `path` (the last one plus `reserve` characters) is too long."""
    path = Path(path)
    limit = _name_max(existing_ancestor(path))
    parts = path.parts
    for i, part in enumerate(parts):
        extra = reserve if i == len(parts) - 1 else 0
        if len(os.fsencode(part)) + extra > limit:
            raise InputError(
                f"{flag} {str(path)[:80]}...: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes long; "
                f"this file system allows {limit - extra} (ENAMETOOLONG). Choose a shorter name."
            )


def check_output_file(path, flag: str) -> None:
    """Refuse an output file path that cannot work (see the module contract); changes nothing on disk."""
    path = Path(path)
    check_name_lengths(path, flag, reserve=len(".tmp-9999999-12345678."))  # first: stat() itself fails on it
    if path.is_symlink() and not path.exists():
        raise InputError(f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                         "pass a real file path.")
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; pass a file name (e.g. {path / 'report.html'}).")
    folder = existing_ancestor(path)
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: {folder} is a file, not a folder; choose a path inside a folder.")
    check_writable_folder(folder, flag, path)


def check_writable_folder(folder: Path, flag: str, path) -> None:
    """ReadOnlyLocation (exit 5) when `folder` (where `path` would be created) is on a read-only file
    system or not writable by this process."""
    if os.access(folder, os.W_OK | os.X_OK):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise ReadOnlyLocation(f"read-only location: {flag} {path} lies on a read-only file system ({folder}); "
                               f"pass {flag} pointing at a writable folder.")
    raise ReadOnlyLocation(f"{flag} {path}: the folder {folder} is not writable (permission denied); choose a "
                           "writable folder or fix its permissions.")


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_temps(path) -> list[Path]:
    """Remove the temporary files that killed writers of `path` left beside it (only
    ``.<name>.tmp-<pid>-<hex>`` regular files whose pid is gone); returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)-[0-9a-f]{{8}}")
    removed = []
    for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*-*"):
        m = pattern.fullmatch(p.name)
        if m and p.is_file() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def open_atomic(path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """Yield a file object on a temporary file beside `path`; renamed over `path` when the block ends cleanly."""
    path = Path(path)
    binary = "b" in mode
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_dead_temps(path)  # leftovers of writers killed before their rename
        tmp = _temp_beside(path)
        with open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise (from_exception(e, path, f"writing {path}") or e) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_atomic(path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write `data` to `path` atomically (see the module contract); returns `path`."""
    with open_atomic(path, "wb" if isinstance(data, bytes) else "w", encoding=encoding) as fh:
        fh.write(data)
    return Path(path)
