"""User-facing errors: each message says what went wrong and what to do.

One taxonomy, four kinds (``WorkbenchError.kind``), each with its exit code:

=============  ====  ==========================================================================
kind           exit  meaning
=============  ====  ==========================================================================
input          2     a mistake in the command or its options (bad number, layer out of range)
busy           3     another live process holds the run (StoreLocked)
model_data     4     the model or the text cannot be used (missing folder, unsupported
                     architecture, text too short, non-finite perplexity, failed export check)
environment    5     the machine refused (disk full, read-only or unwritable folder, a damaged
                     run store); the message names the path and what to do
bug            1     anything else, including an internal consistency check that failed
=============  ====  ==========================================================================

Ctrl-C exits with 130 and SIGTERM with 143 (kind ``interrupted``); what was committed stays.
The CLI prints ``str(error)`` with no traceback and exits with ``exit_code``; the app shows
the same text. ``from_exception`` maps the OS and SQLite failures that are environment
faults (ENOSPC, EROFS, EACCES, "database disk image is malformed", ...) and ENAMETOOLONG (input) onto these classes;
anything it cannot map is a bug.
"""

from __future__ import annotations

import errno
import sqlite3
from dataclasses import dataclass

EXIT_CODES = {"input": 2, "busy": 3, "model_data": 4, "environment": 5, "bug": 1, "interrupted": 130}


class WorkbenchError(Exception):
    kind = "input"
    exit_code = 2


class InputError(WorkbenchError):
    """An option that cannot work (layer count out of range, sequence longer than the model allows)."""


class ModelDataError(WorkbenchError):
    """The model or the text cannot be used as given."""

    kind = "model_data"
    exit_code = 4


class ModelLoadError(ModelDataError):
    """Unknown model, missing local folder, hub unreachable, or remote code refused."""


class UnsupportedArchitecture(ModelDataError):
    """No adapter knows where this model's decoder layers live."""


class DataError(ModelDataError):
    """Calibration or evaluation text missing, empty, unreadable or too short."""


class NonFiniteModel(ModelDataError):
    """The full model's perplexity is NaN/inf: every score would be meaningless."""


class StoreError(WorkbenchError):
    """The run store is unreadable, belongs to another run, or is locked by a live writer."""


class StoreLocked(StoreError):
    kind = "busy"
    exit_code = 3


class ExportError(WorkbenchError):
    """The export folder is not empty (and --overwrite was not given), or the reload check failed."""


class ExportCheckFailed(ExportError):
    """The exported folder does not reload to the same model (numbers in the message)."""

    kind = "model_data"
    exit_code = 4


class EstimationError(WorkbenchError):
    """Too few evaluated masks for the requested fit or estimator."""


class SamplingError(WorkbenchError):
    """Invalid strata / remove range / scheme, or more masks asked for than exist."""


class EnvironmentFault(WorkbenchError):
    """The machine refused: disk full, read-only or unwritable path, damaged file. Names the path."""

    kind = "environment"
    exit_code = 5


class DiskFull(EnvironmentFault):
    pass


class ReadOnlyLocation(EnvironmentFault):
    pass


class StoreDamaged(StoreError, EnvironmentFault):
    """A run store that SQLite cannot read (damaged pages, not a database, no tables)."""

    kind = "environment"
    exit_code = 5


class InternalError(WorkbenchError):
    """An internal consistency check failed (e.g. a NaN score reached the store): a bug, refused loudly."""

    kind = "bug"
    exit_code = 1


_DISK_FULL_TEXT = ("no space left", "disk is full", "database or disk is full", "storagefull", "code: 28")
_READ_ONLY_TEXT = ("read-only file system", "readonly database", "read only file system", "code: 30")
_DAMAGED_TEXT = ("malformed", "file is not a database", "not a database", "database corrupt")


def from_exception(e: BaseException, path=None, doing: str | None = None) -> WorkbenchError | None:
    """The environment error an OS/SQLite/library exception stands for, or None (then it is a bug).

    `path`: the file or folder involved when the exception does not name it; `doing`: what was
    being done ("writing the export"), for the message.
    """
    if isinstance(e, WorkbenchError):
        return e
    where = path if path is not None else getattr(e, "filename", None)
    what = f" while {doing}" if doing else ""
    at = f" at {where}" if where else ""
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    text = str(e).lower()
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or any(t in text for t in _DISK_FULL_TEXT):
        return DiskFull(
            f"disk full{what}{at}: {e}. Free space on that disk (or pass --cache-dir / --out on another "
            "disk) and run the same command again; everything committed so far is kept."
        )
    if code == errno.EROFS or any(t in text for t in _READ_ONLY_TEXT):
        return ReadOnlyLocation(
            f"read-only location{what}{at}: {e}. Pass --cache-dir (or --out) pointing at a writable folder; "
            "`python -m engine status` still reads a read-only cache."
        )
    if code in (errno.EACCES, errno.EPERM):
        return ReadOnlyLocation(
            f"permission denied{what}{at}: {e}. Fix the folder's permissions or choose another "
            "(--cache-dir, --out)."
        )
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return EnvironmentFault(
            f"a path is in the way{what}{at}: {e}. A file stands where a folder is expected (or the other way "
            "round); pass --cache-dir / --out naming a folder."
        )
    if code == errno.ENAMETOOLONG:
        return InputError(
            f"a name is longer than the file system allows (ENAMETOOLONG){what}{at}: {e}. Choose a shorter file or "
            "folder name."
        )
    if isinstance(e, sqlite3.DatabaseError) and any(t in text for t in _DAMAGED_TEXT):
        return StoreDamaged(
            f"the run store{at} is damaged ({e}){what}. Delete its run folder and run the same command again "
            "to start that run afresh; other runs are not affected."
        )
    if isinstance(e, OSError) and code in (errno.EIO,):
        return EnvironmentFault(f"input/output error{what}{at}: {e}. Check the disk.")
    return None


@dataclass(frozen=True)
class Failure:
    """How a command that failed is reported: stderr line, --json fields, exit status."""

    message: str
    type: str  # the exception class
    kind: str  # input | busy | model_data | environment | bug | interrupted
    exit_code: int

    def to_json(self) -> dict:
        return {"error": self.message, "kind": self.kind, "message": self.message, "type": self.type,
                "exit_code": self.exit_code}


def describe(e: BaseException, terminated: bool = False) -> Failure:
    """The one place an exception becomes a reported failure (the CLI prints it; `terminated`: SIGTERM seen)."""
    if terminated or isinstance(e, KeyboardInterrupt):
        why = "terminated (SIGTERM)" if terminated else "interrupted"
        message = str(e) if isinstance(e, WorkbenchError) else (
            f"{why}; everything committed is kept: run the same command again to resume.")
        return Failure(message, "Terminated" if terminated else type(e).__name__, "interrupted",
                       143 if terminated else 130)
    mapped = from_exception(e)
    if mapped is not None:
        return Failure(str(mapped), type(mapped).__name__, mapped.kind, mapped.exit_code)
    return Failure(f"unexpected error ({type(e).__name__}: {e}). This is a bug; re-run with --debug for the "
                   "traceback.", type(e).__name__, "bug", 1)
