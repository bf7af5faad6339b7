"""The run store's on-disk format and its records (see engine/store.py for the contract): the schema
version, the tables' DDL, the frozen records a reader gets (`Sample`, `SampleTable`, `Lease`,
`RunSummary`), the packing of per-window losses into BLOBs, run-id checks and the lease's liveness.
No connection is opened here."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass

import numpy as np

from engine.errors import StoreError

SCHEMA = 3
MIGRATABLE = (1, 2)  # older schemas `RunStore.open` upgrades in place
DB_NAME = "run.sqlite"
LEASE_TIMEOUT_S = 10.0
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
QUICK_CHECK_MAX_BYTES = 512 << 20  # quick_check reads every page: ~1 s per GB; bigger stores skip it
TABLES = ("artifacts", "lease", "meta", "samples")
# Columns schema 3 added to `samples` (name, declaration); `_migrate` adds the missing ones.
V3_COLUMNS = (("round", "INTEGER NOT NULL DEFAULT 0"), ("source", "TEXT NOT NULL DEFAULT 'design'"),
              ("windows", "INTEGER"), ("work", "INTEGER NOT NULL DEFAULT 0"), ("completed", "REAL"))
SOURCES = ("design", "active")  # where a row's mask came from: the sampling design or an active round
SAMPLE_COLUMNS = "rowid, mask, kept, ppl, score, nonfinite, seconds, created, round, source, windows, work, completed"

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    mask TEXT NOT NULL UNIQUE,
    kept INTEGER NOT NULL,
    ppl REAL CHECK (ppl IS NOT NULL OR nonfinite = 1),
    score REAL NOT NULL,
    nonfinite INTEGER NOT NULL CHECK (nonfinite IN (0, 1)),
    seconds REAL NOT NULL,
    created REAL NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT 'design',
    windows INTEGER,
    work INTEGER NOT NULL DEFAULT 0,
    completed REAL
);
CREATE TABLE IF NOT EXISTS window_losses (
    sample_rowid INTEGER PRIMARY KEY REFERENCES samples(rowid),
    n_windows INTEGER NOT NULL,
    nll BLOB NOT NULL,
    tokens BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (name TEXT PRIMARY KEY, json TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    pid INTEGER NOT NULL,
    hostname TEXT NOT NULL,
    token TEXT NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    target INTEGER,
    status TEXT NOT NULL,
    cancel INTEGER NOT NULL DEFAULT 0,
    message TEXT
);
"""


@dataclass(frozen=True)
class Sample:
    """One evaluated mask (a row of ``samples``)."""

    rowid: int
    mask: str  # '0101..', 1 = layer kept
    kept: int
    ppl: float  # NaN/inf kept as evaluated (stored NULL for NaN)
    score: float  # ppl_full / ppl; 0 when ppl is not finite
    nonfinite: bool
    seconds: float
    created: float  # unix time of the commit
    round: int = 0  # sampling round the mask was chosen in (0: the design's first masks)
    source: str = "design"  # design (drawn by the sampling design) | active (chosen by an active round)
    windows: int | None = None  # calibration windows ppl/score cover (None: no per-window losses stored)
    work: int = 0  # token-layer calls spent on this row (first evaluation + completion; 0 before schema 3)
    completed: float | None = None  # unix time of the last `Writer.complete` (None: never completed)


@dataclass(frozen=True)
class SampleTable:
    """The same rows as arrays: masks bool[n, L], the rest [n]."""

    rowid: np.ndarray
    masks: np.ndarray
    ppl: np.ndarray
    score: np.ndarray
    nonfinite: np.ndarray
    seconds: np.ndarray
    window_nll: np.ndarray | None = None  # float64 (n, W): summed NLL per calibration window; None unless every row has them
    window_tokens: np.ndarray | None = None  # int64 (n, W): target tokens per window; None likewise
    round: np.ndarray | None = None  # int (n,): sampling round of each row
    source: np.ndarray | None = None  # str (n,): design | active
    windows: np.ndarray | None = None  # int (n,): evaluated windows per row (-1: no per-window losses)
    work: np.ndarray | None = None  # int (n,): token-layer calls spent on each row


def pack_windows(nll, tokens) -> tuple[int, bytes, bytes]:
    """(W, float64 LE bytes, int64 LE bytes); StoreError unless both are 1-D of the same length >= 1."""
    nll = np.asarray(nll, dtype="<f8").reshape(-1)
    tokens = np.asarray(tokens, dtype="<i8").reshape(-1)
    if len(nll) == 0 or len(nll) != len(tokens):
        raise StoreError(f"per-window losses need one nll and one token count per window; got {len(nll)} and {len(tokens)}")
    return len(nll), nll.tobytes(), tokens.tobytes()


def count_evaluated(tokens) -> int:
    """Windows a row's per-window losses cover: those with tokens > 0 (missing ones hold 0 tokens, NaN nll)."""
    return int(np.count_nonzero(np.asarray(tokens) > 0))


def subset_ppl(nll: np.ndarray, tokens: np.ndarray) -> float:
    """exp(sum nll / sum tokens) over the evaluated windows (tokens > 0); inf on overflow, NaN stays NaN."""
    done = tokens > 0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return float(np.exp(nll[done].sum() / tokens[done].sum()))


def unpack_windows(n_windows: int, nll: bytes, tokens: bytes) -> tuple[np.ndarray, np.ndarray]:
    return (np.frombuffer(nll, dtype="<f8", count=n_windows).astype(np.float64),
            np.frombuffer(tokens, dtype="<i8", count=n_windows).astype(np.int64))


@dataclass(frozen=True)
class Lease:
    pid: int
    hostname: str
    token: str
    started: float
    heartbeat: float
    target: int | None
    status: str
    cancel: bool
    message: str | None

    def alive(self, now: float | None = None) -> bool:
        """True while a running writer holds it (see module contract)."""
        if self.status != "running":
            return False
        now = time.time() if now is None else now
        if now - self.heartbeat > LEASE_TIMEOUT_S:
            return False
        if self.hostname == socket.gethostname():
            return pid_alive(self.pid)
        return True


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    path: str
    model: str | None
    data: str | None
    n_layers: int | None
    n_samples: int
    status: str  # new | running | finished | cancelled | failed | died
    target: int | None
    created: float | None
    updated: float | None
    problem: str | None = None  # why the store cannot be read (status damaged | unreadable | empty)
    work: int = 0  # token-layer calls spent on the stored rows (fidelity.work; 0 for rows before schema 3)
    evaluated_windows: int = 0  # calibration windows evaluated over all rows
    partial: int = 0  # rows evaluated on some of the calibration windows only
    rounds: dict | None = None  # {round: {"masks": rows, "active": rows chosen by the active rule}}


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this host (the lease check; the app's launcher check)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID.match(run_id) or ".." in run_id:
        raise StoreError(f"invalid run id {run_id!r}: use letters, digits, '-', '_' or '.'.")
    return run_id
