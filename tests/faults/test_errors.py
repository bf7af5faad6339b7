"""One taxonomy: OS and SQLite failures map to environment errors naming the path; the rest is a bug."""

import errno
import sqlite3

import pytest

from engine.errors import (
    DiskFull, EnvironmentFault, ReadOnlyLocation, StoreDamaged, WorkbenchError, describe, from_exception,
)

CASES = [
    (OSError(errno.ENOSPC, "No space left on device", "/data/x"), DiskFull, "/data/x"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), ReadOnlyLocation, "/ro/x"),
    (PermissionError(errno.EACCES, "Permission denied", "/p/x"), ReadOnlyLocation, "/p/x"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), EnvironmentFault, "/f/x"),
    (sqlite3.DatabaseError("database disk image is malformed"), StoreDamaged, None),
    (sqlite3.DatabaseError("file is not a database"), StoreDamaged, None),
    (sqlite3.OperationalError("database or disk is full"), DiskFull, None),
    (sqlite3.OperationalError("attempt to write a readonly database"), ReadOnlyLocation, None),
    (RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"), DiskFull, None),
]


@pytest.mark.parametrize("exc,cls,path", CASES, ids=[type(c[0]).__name__ + ":" + str(c[0])[:30] for c in CASES])
def test_environment_faults_are_named_and_say_what_to_do(exc, cls, path):
    mapped = from_exception(exc, path=None if path else "/cache/run.sqlite")
    assert type(mapped) is cls and mapped.kind == "environment" and mapped.exit_code == 5
    assert (path or "/cache/run.sqlite") in str(mapped)
    f = describe(exc)
    assert f.kind == "environment" and f.exit_code == 5 and f.to_json()["error"] == f.message


def test_everything_else_is_a_bug_and_interrupts_are_interrupts():
    assert from_exception(ValueError("x")) is None
    f = describe(ValueError("kaboom"))
    assert (f.kind, f.exit_code, f.type) == ("bug", 1, "ValueError") and "--debug" in f.message
    assert describe(KeyboardInterrupt()).exit_code == 130
    t = describe(KeyboardInterrupt(), terminated=True)
    assert (t.kind, t.exit_code, t.type) == ("interrupted", 143, "Terminated") and "SIGTERM" in t.message
    w = describe(WorkbenchError("bad option"))
    assert (w.kind, w.exit_code, w.message) == ("input", 2, "bad option")
    assert set(w.to_json()) >= {"error", "kind", "message", "type"}
