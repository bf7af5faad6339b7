"""Run stores: the only code that reads or writes the cache directory.

Contract
--------
* One SQLite database in WAL mode per run: ``<cache_dir>/<run_id>/run.sqlite``.
  ``cache_dir`` comes from ``--cache-dir``, else ``$LAYERPRUNE_CACHE``, else ``./cache``
  (``config.default_cache_dir``). Nothing is ever written outside ``cache_dir``; run ids
  are checked to be plain names (letters, digits, ``-``, ``_``).
* Tables
  - ``meta(key, json)``: ``run_id``, ``spec`` (the RunSpec), ``model_identity``,
    ``model`` (name), ``data_hash``, ``data`` (source), ``n_layers``, ``ppl_full``,
    ``created``, ``versions`` (package versions), ``schema``. Written when the run is
    created; later stages may add keys with ``set_meta``.
  - ``samples(rowid, mask TEXT UNIQUE, kept, ppl, score, nonfinite, seconds, created, round,
    source, windows, work, completed)``: one row per evaluated mask, ``mask`` as ``'0101..'``
    (``1`` = layer kept). Each row is committed on its own as soon as the mask is evaluated, so a
    killed writer loses at most the mask it was evaluating. A mask is never stored twice.
    Schema 3: ``round`` (sampling round, 0 = the design's first masks), ``source`` (``design``:
    drawn by the sampling design | ``active``: chosen by an active round), ``windows`` (calibration
    windows the row's ppl/score cover; NULL without per-window losses), ``work`` (token-layer calls
    spent on the row, engine.fidelity.work), ``completed`` (time of the last completion). A
    *partial* row (windows < W) has ppl/score over its evaluated windows only
    (fidelity.subset_scores) and tokens 0 / nll NaN for the others; ``Writer.complete`` fills them
    (never changing an evaluated window) and updates ppl/score in the same transaction.
  - ``window_losses(sample_rowid PRIMARY KEY -> samples.rowid, n_windows, nll BLOB, tokens BLOB)``
    (schema 2): the mask's summed NLL (float64) and target-token count (int64) per calibration
    window, little-endian arrays of ``n_windows`` values; written in the same transaction as the
    sample row, so a row has its windows or (rows of a version-1 store, or written without
    them) none. ``perplexity = exp(sum nll / sum tokens)``. The unmodified model's per-window
    losses are the meta key ``window_losses_full`` (``{"nll": [...], "tokens": [...]}``).
  - ``artifacts(name PRIMARY KEY, json, created)``: JSON results of later stages
    (fit metrics, contributions, decisions); ``put_artifact`` replaces by name.
  - ``lease`` (at most one row): the writer's ``pid``, ``hostname``, ``token``,
    ``heartbeat`` (unix time), ``target`` (masks asked for), ``status``
    (running | finished | cancelled | failed), ``cancel`` flag, ``message``.
* Writers: ``with store.writer(target) as w: w.add(...)``. Only one writer per run: a
  second one gets ``StoreLocked`` (naming pid, host and how to stop it) while the first
  is alive. The writer's background thread refreshes ``heartbeat`` every
  ``HEARTBEAT_S``; a lease is dead once its heartbeat is older than ``LEASE_TIMEOUT_S``
  or, on the same host, as soon as its pid is gone, and a new writer may then take it.
  Leaving the ``with`` block sets the status: finished (normal exit), cancelled
  (``w.cancelled`` was set or KeyboardInterrupt) or failed (any other exception).
* Cancel: any process may call ``store.request_cancel()``; the writer sees it through
  ``w.cancel_requested()``, which it checks between masks.
* Readers never block the writer (WAL). ``results(since_rowid)`` returns the rows with
  ``rowid > since_rowid`` as a list of frozen ``Sample`` records in rowid order, so a
  poller passes the last rowid it saw and gets only new rows; ``table()`` returns the
  same rows as numpy arrays for fitting.
* Versions: ``SCHEMA`` = 3. A version-1 or -2 store is migrated when opened, in one transaction:
  the ``window_losses`` table is added (version 1: its rows keep their whole-mask perplexities and
  have no per-window losses, None in ``table()``), the schema-3 columns are added (round 0, source
  design, windows from the stored per-window losses, work 0) and ``meta.schema`` set to 3.
  A store of a newer schema is refused.
* Every call opens and closes its own connection, so a ``RunStore`` may be shared
  between threads (Streamlit) and processes.
* Nothing is dropped silently: ``Writer.add`` refuses a row with a NaN/inf score or a NULL
  field with ``InternalError`` (only an already stored mask is skipped), and the table's
  NOT NULL / CHECK constraints refuse such a row too, loudly, if the check is bypassed.
* Faults: ``open`` runs ``PRAGMA quick_check`` (stores up to ``QUICK_CHECK_MAX_BYTES``) and
  refuses a damaged store with ``StoreDamaged`` before anything is read; a file with no tables
  is initialised when ``meta`` is given (a creation that was killed), else refused. A folder
  that cannot be written (read-only mount, permissions) is opened read-only (``mode=ro``
  URI), so reading works and a write fails with ``ReadOnlyLocation``. SQLite and OS errors
  become ``engine.errors`` environment errors naming the database (disk full, read-only,
  damaged); ``list_runs`` lists every run folder, with a ``problem`` for the unreadable ones.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from engine.config import default_cache_dir
from engine.errors import (
    EnvironmentFault, InternalError, ReadOnlyLocation, StoreDamaged, StoreError, StoreLocked, from_exception,
)

SCHEMA = 3
MIGRATABLE = (1, 2)  # older schemas `RunStore.open` upgrades in place
DB_NAME = "run.sqlite"
HEARTBEAT_S = 2.0
LEASE_TIMEOUT_S = 10.0
_BUSY_TIMEOUT_MS = 10_000
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
QUICK_CHECK_MAX_BYTES = 512 << 20  # quick_check reads every page: ~1 s per GB; bigger stores skip it
TABLES = ("artifacts", "lease", "meta", "samples")
# Columns schema 3 added to `samples` (name, declaration); `_migrate` adds the missing ones.
V3_COLUMNS = (("round", "INTEGER NOT NULL DEFAULT 0"), ("source", "TEXT NOT NULL DEFAULT 'design'"),
              ("windows", "INTEGER"), ("work", "INTEGER NOT NULL DEFAULT 0"), ("completed", "REAL"))
SOURCES = ("design", "active")  # where a row's mask came from: the sampling design or an active round
_SAMPLE_COLUMNS = "rowid, mask, kept, ppl, score, nonfinite, seconds, created, round, source, windows, work, completed"

_DDL = """
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


def _pack_windows(nll, tokens) -> tuple[int, bytes, bytes]:
    """(W, float64 LE bytes, int64 LE bytes); StoreError unless both are 1-D of the same length >= 1."""
    nll = np.asarray(nll, dtype="<f8").reshape(-1)
    tokens = np.asarray(tokens, dtype="<i8").reshape(-1)
    if len(nll) == 0 or len(nll) != len(tokens):
        raise StoreError(f"per-window losses need one nll and one token count per window; got {len(nll)} and {len(tokens)}")
    return len(nll), nll.tobytes(), tokens.tobytes()


def _evaluated(tokens) -> int:
    """Windows a row's per-window losses cover: those with tokens > 0 (missing ones hold 0 tokens, NaN nll)."""
    return int(np.count_nonzero(np.asarray(tokens) > 0))


def _subset_ppl(nll: np.ndarray, tokens: np.ndarray) -> float:
    """exp(sum nll / sum tokens) over the evaluated windows (tokens > 0); inf on overflow, NaN stays NaN."""
    done = tokens > 0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return float(np.exp(nll[done].sum() / tokens[done].sum()))


def _unpack_windows(n_windows: int, nll: bytes, tokens: bytes) -> tuple[np.ndarray, np.ndarray]:
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


def _dumps(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise StoreError(f"invalid run id {run_id!r}: use letters, digits, '-', '_' or '.'.")
    return run_id


class RunStore:
    """A handle on one run's database (see the module contract)."""

    def __init__(self, cache_dir: str | os.PathLike | None, run_id: str):
        self.cache_dir = Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir()
        self.run_id = _check_run_id(run_id)
        self.dir = self.cache_dir / run_id
        self.path = self.dir / DB_NAME

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, cache_dir, run_id: str, meta: dict | None = None) -> "RunStore":
        """Open a run; create it (with ``meta``) if it does not exist yet.

        Without ``meta`` the run must exist (StoreError otherwise). With ``meta`` and an
        existing run, the stored ``run_id`` must match.
        """
        store = cls(cache_dir, run_id)
        if store.exists() and not store._check(initialise_meta=meta):
            store._create(meta)  # an empty database file (a creation that was killed): nothing to lose
            return store
        if store.exists():
            stored = store.meta()
            if stored.get("schema") in MIGRATABLE:
                if store.read_only():
                    raise StoreError(
                        f"{store.path} was written by an older version (schema {stored.get('schema')}) and is on a "
                        f"read-only location, so it cannot be upgraded to schema {SCHEMA}; copy the run folder "
                        f"{store.dir} into a writable --cache-dir and open it there."
                    )
                store._migrate()
                stored = store.meta()
            if stored.get("schema") != SCHEMA:
                raise StoreError(
                    f"{store.path} was written by another version of the workbench (schema "
                    f"{stored.get('schema')}, expected {SCHEMA}); move it away or use another --cache-dir."
                )
            if stored.get("run_id") != run_id:
                raise StoreError(f"{store.path} belongs to run {stored.get('run_id')!r}, not {run_id!r}.")
            return store
        if meta is None:
            raise StoreError(f"no run {run_id!r} in {store.cache_dir}; run `python -m engine sample` first.")
        store._create(meta)
        return store

    def exists(self) -> bool:
        return self.path.is_file()

    def _migrate(self) -> None:
        """Version 1 or 2 -> 3 in one transaction: add ``window_losses`` (empty; version 1), add the
        schema-3 columns of ``samples`` (round 0, source 'design', windows = the stored per-window
        count or NULL, work 0), set meta.schema = 3 and ``migrated_from``. Idempotent; two processes
        opening the same old store serialise on the write lock."""
        with self._write() as con:
            row = con.execute("SELECT json FROM meta WHERE key = 'schema'").fetchone()
            if row is None or json.loads(row[0]) not in MIGRATABLE:
                return  # another process migrated it first
            for statement in _DDL.split(";"):
                if statement.strip():
                    con.execute(statement)  # CREATE TABLE IF NOT EXISTS: only the new table is created
            have = {r[1] for r in con.execute("PRAGMA table_info(samples)")}
            for name, declaration in V3_COLUMNS:
                if name not in have:
                    con.execute(f"ALTER TABLE samples ADD COLUMN {name} {declaration}")
            con.execute("UPDATE samples SET windows = (SELECT n_windows FROM window_losses "
                        "WHERE sample_rowid = samples.rowid) WHERE windows IS NULL")
            con.execute("INSERT OR REPLACE INTO meta(key, json) VALUES ('schema', ?)", (_dumps(SCHEMA),))
            con.execute("INSERT OR REPLACE INTO meta(key, json) VALUES ('migrated_from', ?)", (row[0],))

    def read_only(self) -> bool:
        """True when this process cannot write the run's folder or database (read-only mount, permissions)."""
        return self.path.is_file() and not (os.access(self.dir, os.W_OK) and os.access(self.path, os.W_OK))

    def _check(self, initialise_meta: dict | None = None) -> bool:
        """Refuse a damaged store (StoreDamaged); False if it has no tables and may be initialised."""
        try:
            with self._connect() as con:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not tables & set(TABLES):
                    if initialise_meta is not None and not self.read_only():
                        return False
                    raise StoreDamaged(
                        f"the run store {self.path} has no tables (its creation was interrupted, or the file was "
                        f"emptied); nothing was evaluated in it. Delete the folder {self.dir} and run the command "
                        "again."
                    )
                missing = sorted(set(TABLES) - tables)
                if missing:
                    raise StoreDamaged(
                        f"the run store {self.path} lacks the table(s) {', '.join(missing)}; it was not written by "
                        f"this workbench or was damaged. Move the folder {self.dir} away and run the command again."
                    )
                if self.path.stat().st_size <= QUICK_CHECK_MAX_BYTES:
                    problems = [r[0] for r in con.execute("PRAGMA quick_check(5)")]
                    if problems != ["ok"]:
                        raise StoreDamaged(
                            f"the run store {self.path} is damaged ({'; '.join(problems)}); it is not read, to "
                            f"avoid half-read results. Delete the folder {self.dir} and run the command again "
                            "to redo that run (other runs are not affected)."
                        )
        except OSError as e:
            raise from_exception(e, self.path, "checking the run store") or e
        return True

    def _create(self, meta: dict) -> None:
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise EnvironmentFault(f"the cache directory {self.cache_dir} is a file; pass --cache-dir naming a folder.")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise from_exception(e, self.dir, "creating the run folder") or e
        with self._connect(write=True, create=True) as con:
            for statement in _DDL.split(";"):
                if statement.strip():
                    con.execute(statement)
            rows = {**meta, "run_id": self.run_id, "schema": SCHEMA, "created": meta.get("created", time.time())}
            con.executemany(
                "INSERT OR IGNORE INTO meta(key, json) VALUES (?, ?)", [(k, _dumps(v)) for k, v in rows.items()]
            )

    def _open_connection(self, create: bool = False) -> sqlite3.Connection:
        if not create and not self.path.is_file():
            raise StoreError(f"run store {self.path} does not exist (was the run deleted?).")
        try:
            if not create and self.read_only():
                con = self._connect_read_only()
            else:
                con = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
                con.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
                # WAL + NORMAL: a commit survives a crash of this process (what matters here);
                # only a power loss may drop the last commits. FULL costs an fsync per mask.
                con.execute("PRAGMA synchronous=NORMAL")
                if create:
                    con.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
        except sqlite3.Error as e:
            raise from_exception(e, self.path, "opening the run store") or StoreError(
                f"cannot open run store {self.path}: {e}. If the file is damaged, delete its folder {self.dir} and "
                "run the command again."
            ) from e
        return con

    def _connect_read_only(self) -> sqlite3.Connection:
        """mode=ro (sees a WAL left by a live writer); immutable=1 when the folder cannot hold a -shm file."""
        uri = "file:" + quote(str(self.path))
        try:
            con = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return con
        except sqlite3.OperationalError:
            wal = Path(str(self.path) + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise
        return sqlite3.connect(uri + "?immutable=1", uri=True, isolation_level=None)

    @contextmanager
    def _connect(self, write: bool = False, create: bool = False, con: sqlite3.Connection | None = None):
        """One transaction; commits on success, rolls back on error.

        On a short-lived connection unless `con` is given (the writer keeps its own: closing
        the last connection checkpoints the WAL, which costs milliseconds per mask).
        write=True takes the write lock up front (BEGIN IMMEDIATE: no lock-upgrade deadlocks).
        """
        own = con is None
        if own:
            con = self._open_connection(create)
        try:
            con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield con
            con.execute("COMMIT")
        except BaseException as e:
            try:
                if con.in_transaction:
                    con.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolls back by itself when the connection closes; report the first error
            if isinstance(e, sqlite3.Error) and not isinstance(e, sqlite3.IntegrityError):
                raise self._environment_error(e, write) from e
            raise
        finally:
            if own:
                con.close()

    def _environment_error(self, e: sqlite3.Error, write: bool) -> Exception:
        """The engine.errors error a SQLite failure stands for (the original when it is a bug)."""
        if write and self.read_only():
            return ReadOnlyLocation(
                f"the run store {self.path} is on a read-only location or not writable by this user ({e}). "
                "Reading works (`python -m engine status`); to add to the run, pass --cache-dir naming a "
                "writable copy of the cache, or fix the folder's permissions."
            )
        text = str(e).lower()
        if "no such table" in text:
            return StoreDamaged(
                f"the run store {self.path} lacks a table ({e}); delete the folder {self.dir} and run the "
                "command again."
            )
        return from_exception(e, self.path, "writing the run store" if write else "reading the run store") or e

    def _write(self):
        return self._connect(write=True)

    # -- meta and artifacts -------------------------------------------------------------
    def meta(self) -> dict:
        with self._connect() as con:
            return {k: json.loads(v) for k, v in con.execute("SELECT key, json FROM meta")}

    def set_meta(self, **values) -> None:
        with self._write() as con:
            con.executemany(
                "INSERT OR REPLACE INTO meta(key, json) VALUES (?, ?)", [(k, _dumps(v)) for k, v in values.items()]
            )

    def put_artifact(self, name: str, obj) -> None:
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts(name, json, created) VALUES (?, ?, ?)",
                (name, _dumps(obj), time.time()),
            )

    def get_artifact(self, name: str, default=None):
        with self._connect() as con:
            row = con.execute("SELECT json FROM artifacts WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else default

    def latest_artifact(self, prefixes: tuple[str, ...]) -> tuple[str, dict] | None:
        """(name, object) of the most recently written artifact whose name starts with one of
        `prefixes` (e.g. ``("decisions:", "summary:")``), or None."""
        where = " OR ".join("name LIKE ? ESCAPE '\\'" for _ in prefixes)
        like = [p.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" for p in prefixes]
        with self._connect() as con:
            row = con.execute(f"SELECT name, json FROM artifacts WHERE {where} ORDER BY created DESC, name LIMIT 1",
                              like).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def artifact_names(self) -> list[str]:
        with self._connect() as con:
            return [r[0] for r in con.execute("SELECT name FROM artifacts ORDER BY name")]

    # -- samples --------------------------------------------------------------------------
    def count(self) -> int:
        with self._connect() as con:
            return con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]

    def done_masks(self) -> set[str]:
        with self._connect() as con:
            return {r[0] for r in con.execute("SELECT mask FROM samples")}

    def results(self, since_rowid: int = 0) -> list[Sample]:
        """Rows with rowid > since_rowid, in rowid order, as frozen records."""
        with self._connect() as con:
            rows = con.execute(
                f"SELECT {_SAMPLE_COLUMNS} FROM samples WHERE rowid > ? ORDER BY rowid", (since_rowid,),
            ).fetchall()
        return [
            Sample(r[0], r[1], r[2], float("nan") if r[3] is None else r[3], r[4], bool(r[5]), r[6], r[7], *r[8:])
            for r in rows
        ]

    def evaluated_windows(self) -> int:
        """Calibration windows evaluated over all rows (a row without per-window losses counts 0). It grows
        with every new row and every completion, so artifacts record it next to the mask count (staleness)."""
        with self._connect() as con:
            return int(con.execute("SELECT COALESCE(SUM(windows), 0) FROM samples").fetchone()[0])

    def window_losses(self, since_rowid: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """{rowid: (nll float64[W], tokens int64[W])} for the rows with rowid > since_rowid that have them."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT sample_rowid, n_windows, nll, tokens FROM window_losses WHERE sample_rowid > ?",
                (since_rowid,),
            ).fetchall()
        return {r[0]: _unpack_windows(r[1], r[2], r[3]) for r in rows}

    def table(self, since_rowid: int = 0) -> SampleTable:
        """The rows as arrays; window_nll / window_tokens (n, W) only when every row has per-window
        losses with the same W (else None: e.g. a migrated version-1 store)."""
        rows = self.results(since_rowid)
        L = int(self.meta().get("n_layers") or (len(rows[0].mask) if rows else 0))
        masks = np.array([[c == "1" for c in r.mask] for r in rows], dtype=bool).reshape(len(rows), L)
        windows = self.window_losses(since_rowid)
        window_nll = window_tokens = None
        if rows and all(r.rowid in windows for r in rows) and len({len(windows[r.rowid][0]) for r in rows}) == 1:
            window_nll = np.stack([windows[r.rowid][0] for r in rows])  # (n, W)
            window_tokens = np.stack([windows[r.rowid][1] for r in rows])  # (n, W)
        return SampleTable(
            rowid=np.array([r.rowid for r in rows], dtype=np.int64),
            masks=masks,  # (n, L)
            ppl=np.array([r.ppl for r in rows], dtype=float),
            score=np.array([r.score for r in rows], dtype=float),
            nonfinite=np.array([r.nonfinite for r in rows], dtype=bool),
            seconds=np.array([r.seconds for r in rows], dtype=float),
            window_nll=window_nll,
            window_tokens=window_tokens,
            round=np.array([r.round for r in rows], dtype=np.int64),
            source=np.array([r.source for r in rows], dtype=object),
            windows=np.array([-1 if r.windows is None else r.windows for r in rows], dtype=np.int64),
            work=np.array([r.work for r in rows], dtype=np.int64),
        )

    # -- lease -------------------------------------------------------------------------------
    def lease(self) -> Lease | None:
        with self._connect() as con:
            row = con.execute(
                "SELECT pid, hostname, token, started, heartbeat, target, status, cancel, message FROM lease"
            ).fetchone()
        return None if row is None else Lease(*row[:7], bool(row[7]), row[8])

    def request_cancel(self) -> bool:
        """Ask the running writer to stop after its current mask. False if none is running."""
        with self._write() as con:
            cur = con.execute("UPDATE lease SET cancel = 1 WHERE status = 'running'")
            return cur.rowcount > 0

    def writer(self, target: int | None = None) -> "Writer":
        """Take the writer lease (StoreLocked if a live writer holds it); use as a context manager."""
        return Writer(self, target)

    def summary(self) -> RunSummary:
        meta = self.meta()
        lease = self.lease()
        with self._connect() as con:
            n, last = con.execute("SELECT COUNT(*), MAX(created) FROM samples").fetchone()
            work, done, partial, rounds = 0, 0, 0, {}
            if "work" in {r[1] for r in con.execute("PRAGMA table_info(samples)")}:  # schema 3 (list_runs
                # summarises older stores without migrating them)
                completed, work, done = con.execute(
                    "SELECT MAX(completed), COALESCE(SUM(work), 0), COALESCE(SUM(windows), 0) FROM samples").fetchone()
                last = max([t for t in (last, completed) if t is not None], default=None)
                rounds = {int(r): {"masks": int(c), "active": int(a)} for r, c, a in con.execute(
                    "SELECT round, COUNT(*), SUM(source = 'active') FROM samples GROUP BY round ORDER BY round")}
                full = self._full_windows(con)
                partial = 0 if full is None else con.execute(
                    "SELECT COUNT(*) FROM samples WHERE windows IS NOT NULL AND windows < ?", (full,)).fetchone()[0]
        if lease is None:
            status = "new"
        elif lease.status == "running" and not lease.alive():
            status = "died"
        else:
            status = lease.status
        updated = max([t for t in (last, lease.heartbeat if lease else None, meta.get("created")) if t is not None],
                      default=None)
        return RunSummary(
            run_id=self.run_id,
            path=str(self.path),
            model=meta.get("model"),
            data=meta.get("data"),
            n_layers=meta.get("n_layers"),
            n_samples=n,
            status=status,
            target=lease.target if lease else None,
            created=meta.get("created"),
            updated=updated,
            work=int(work),
            evaluated_windows=int(done),
            partial=int(partial),
            rounds=rounds,
        )

    @staticmethod
    def _full_windows(con) -> int | None:
        """W: the calibration windows of the run (from the full model's per-window losses), or None."""
        row = con.execute("SELECT json FROM meta WHERE key = 'window_losses_full'").fetchone()
        return None if row is None else len(json.loads(row[0])["tokens"])


class Writer:
    """The single writer of a run: holds the lease, heartbeats, commits one row per mask."""

    def __init__(self, store: RunStore, target: int | None):
        self.store = store
        self.target = target
        self.token = uuid.uuid4().hex
        self.cancelled = False  # set by the caller when it stops on a cancel request
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._con: sqlite3.Connection | None = None  # this writer's connection (its thread only)

    def __enter__(self) -> "Writer":
        now = time.time()
        self._con = self.store._open_connection()
        try:
            with self.store._connect(write=True, con=self._con) as con:
                row = con.execute(
                    "SELECT pid, hostname, token, started, heartbeat, target, status, cancel, message FROM lease"
                ).fetchone()
                if row is not None:
                    held = Lease(*row[:7], bool(row[7]), row[8])
                    if held.alive(now):
                        raise StoreLocked(
                            f"run {self.store.run_id} is being written by pid {held.pid} on {held.hostname} "
                            f"(last heartbeat {now - held.heartbeat:.0f} s ago, target {held.target} masks). "
                            f"Wait for it, cancel it from the app, or stop it with `kill {held.pid}` on "
                            f"{held.hostname}; a dead writer's lease expires after {LEASE_TIMEOUT_S:.0f} s."
                        )
                con.execute(
                    "INSERT OR REPLACE INTO lease(id, pid, hostname, token, started, heartbeat, target, status, cancel, "
                    "message) VALUES (1, ?, ?, ?, ?, ?, ?, 'running', 0, NULL)",
                    (os.getpid(), socket.gethostname(), self.token, now, now, self.target),
                )
        except BaseException:
            self._con.close()
            raise
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.store.run_id}", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        con = self.store._open_connection()
        try:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    with self.store._connect(write=True, con=con):
                        con.execute("UPDATE lease SET heartbeat = ? WHERE token = ?", (time.time(), self.token))
                except Exception:  # a busy database (or a full disk): the next beat retries;
                    pass  # the lease only expires after LEASE_TIMEOUT_S, and the writer itself reports faults
        finally:
            con.close()

    def cancel_requested(self) -> bool:
        with self.store._connect(con=self._con) as con:
            row = con.execute("SELECT cancel FROM lease WHERE token = ?", (self.token,)).fetchone()
        return bool(row and row[0])

    def add(self, mask: str, ppl: float, score: float, nonfinite: bool, seconds: float,
            window_nll=None, window_tokens=None, round: int = 0, source: str = "design", work: int = 0) -> int:
        """Commit one evaluated mask now; returns its rowid. A mask already stored is kept, not replaced.

        window_nll float[W] / window_tokens int[W] (both or neither): its per-window losses, committed
        in the same transaction as the row. A partially evaluated row has tokens 0 (and nll NaN) for
        the windows not evaluated yet; its ppl / score are then those of the evaluated windows
        (fidelity.subset_scores) and `Writer.complete` fills the rest later. round / source: the
        sampling round and where the mask came from (SOURCES); work: token-layer calls spent on it.
        Refuses (InternalError, nothing written) a score that is
        not a finite number, a NaN/inf perplexity without the nonfinite flag, or a mask that is not a
        '0'/'1' string: such a row would otherwise be dropped or poison every fit.
        """
        if (window_nll is None) != (window_tokens is None):
            raise StoreError("give both window_nll and window_tokens, or neither")
        if source not in SOURCES:
            raise StoreError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
        packed = None if window_nll is None else _pack_windows(window_nll, window_tokens)
        n_evaluated = None if window_tokens is None else _evaluated(window_tokens)
        now = time.time()
        bad = []
        if not isinstance(mask, str) or not mask or set(mask) - {"0", "1"}:
            bad.append(f"mask {mask!r} is not a string of 0/1")
        if score is None or not math.isfinite(float(score)):
            bad.append(f"score {score} is not finite")
        ppl_finite = ppl is not None and math.isfinite(float(ppl))
        if not ppl_finite and not nonfinite:
            bad.append(f"perplexity {ppl} is not finite but the row is not flagged nonfinite")
        if seconds is None or not math.isfinite(float(seconds)):
            bad.append(f"seconds {seconds} is not finite")
        if bad:
            raise InternalError(
                f"refusing to store mask {mask!r} in {self.store.path}: {'; '.join(bad)}. Nothing was stored for "
                "this mask. This is a bug (non-finite perplexities must be flagged, scores finite): please "
                "report it with the command line."
            )
        with self.store._connect(write=True, con=self._con) as con:
            self._check_lease(con)
            ppl_value = None if ppl is None or np.isnan(ppl) else float(ppl)
            try:
                # ON CONFLICT(mask) skips only a mask already stored; a NULL/NOT NULL or CHECK violation
                # raises (INSERT OR IGNORE would drop such a row without a word).
                cur = con.execute(
                    "INSERT INTO samples(mask, kept, ppl, score, nonfinite, seconds, created, round, source, windows, "
                    "work) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(mask) DO NOTHING",
                    (mask, mask.count("1"), ppl_value, float(score), int(bool(nonfinite)), float(seconds), now,
                     int(round), source, n_evaluated, int(work)),
                )
            except sqlite3.IntegrityError as e:
                raise InternalError(f"the run store {self.store.path} refused mask {mask!r}: {e}. This is a bug.") from e
            rowid = cur.lastrowid if cur.rowcount == 1 else None
            if rowid is None:
                rowid = con.execute("SELECT rowid FROM samples WHERE mask = ?", (mask,)).fetchone()[0]
            if packed is not None and cur.rowcount == 1:
                con.execute("INSERT INTO window_losses(sample_rowid, n_windows, nll, tokens) VALUES (?, ?, ?, ?)",
                            (rowid, *packed))
            con.execute("UPDATE lease SET heartbeat = ? WHERE token = ?", (now, self.token))
            return rowid

    def complete(self, mask: str, window_nll, window_tokens, seconds: float = 0.0, work: int = 0) -> tuple[float, float]:
        """Fill a stored row's missing windows; returns its new (ppl, score). One transaction.

        window_nll float[W] / window_tokens int[W]: losses of the newly evaluated windows (tokens > 0),
        tokens 0 elsewhere. Only windows the row lacks are written; giving a different value for an
        evaluated window is refused (StoreError, nothing written), the same value is accepted (a
        resumed completion). ppl, score (fidelity.row_scores against the full model's per-window
        losses in meta `window_losses_full`) and nonfinite are recomputed over the evaluated windows;
        `seconds` and `work` (token-layer calls) are added to the row's, `completed` set to now.
        """
        from engine.fidelity import row_scores  # the score fresh rows get (pipeline.collect)

        new_nll = np.asarray(window_nll, dtype=np.float64).reshape(-1)  # (W,)
        new_tok = np.asarray(window_tokens, dtype=np.int64).reshape(-1)  # (W,)
        now = time.time()
        with self.store._connect(write=True, con=self._con) as con:
            self._check_lease(con)
            row = con.execute("SELECT s.rowid, w.n_windows, w.nll, w.tokens FROM samples s JOIN window_losses w "
                              "ON w.sample_rowid = s.rowid WHERE s.mask = ?", (mask,)).fetchone()
            if row is None:
                raise StoreError(f"run {self.store.run_id} has no per-window losses for mask {mask!r} to complete")
            rowid, W = row[0], row[1]
            nll, tok = _unpack_windows(W, row[2], row[3])
            if len(new_nll) != W or len(new_tok) != W:
                raise StoreError(f"mask {mask!r} has {W} windows; got {len(new_nll)} losses and {len(new_tok)} counts")
            both = (tok > 0) & (new_tok > 0)
            old_v, new_v = nll[both], new_nll[both]
            same = (tok[both] == new_tok[both]) & ((old_v == new_v) | np.isnan(old_v) & np.isnan(new_v))
            if not same.all():
                raise StoreError(f"refusing to change evaluated windows {np.flatnonzero(both)[~same].tolist()} of mask "
                                 f"{mask!r}: a completion only fills missing windows")
            fill = (tok == 0) & (new_tok > 0)  # (W,)
            nll, tok = np.where(fill, new_nll, nll), np.where(fill, new_tok, tok)
            full = json.loads(con.execute("SELECT json FROM meta WHERE key = 'window_losses_full'").fetchone()[0])
            score, flag = row_scores(None, None, nll[None], tok[None], np.asarray(full["nll"], dtype=np.float64),
                                     np.asarray(full["tokens"], dtype=np.int64))
            ppl = _subset_ppl(nll, tok)
            _, nll_bytes, tok_bytes = _pack_windows(nll, tok)
            con.execute("UPDATE window_losses SET nll = ?, tokens = ? WHERE sample_rowid = ?",
                        (nll_bytes, tok_bytes, rowid))
            con.execute("UPDATE samples SET ppl = ?, score = ?, nonfinite = ?, windows = ?, seconds = seconds + ?, "
                        "work = work + ?, completed = ? WHERE rowid = ?",
                        (None if np.isnan(ppl) else ppl, float(score[0]), int(bool(flag[0])), _evaluated(tok),
                         float(seconds), int(work), now, rowid))
            con.execute("UPDATE lease SET heartbeat = ? WHERE token = ?", (now, self.token))
            return ppl, float(score[0])

    def _check_lease(self, con) -> None:
        holder = con.execute("SELECT token FROM lease").fetchone()
        if holder is None or holder[0] != self.token:
            raise StoreLocked(
                f"run {self.store.run_id}: this writer lost its lease (its heartbeat stopped for over "
                f"{LEASE_TIMEOUT_S:.0f} s and another writer took over); stopping."
            )

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None:
            status, message = ("cancelled" if self.cancelled else "finished"), None
        elif issubclass(exc_type, KeyboardInterrupt):
            status, message = "cancelled", "interrupted"
        else:
            status, message = "failed", f"{exc_type.__name__}: {exc}"
        try:
            with self.store._connect(write=True, con=self._con) as con:
                con.execute(
                    "UPDATE lease SET status = ?, message = ?, heartbeat = ? WHERE token = ?",
                    (status, message, time.time(), self.token),
                )
        except Exception:
            pass  # the lease then expires by itself; never mask the original exception
        finally:
            self._con.close()


def list_runs(cache_dir=None) -> list[RunSummary]:
    """Every run folder under cache_dir, most recently updated first; readable or not.

    A folder holding ``run.sqlite`` (or named like a run id) is listed; one whose store cannot be
    read gets status ``damaged`` (damaged pages, no tables, another schema) or ``unreadable``
    (permissions, I/O) and a ``problem`` saying what to do, or ``empty`` (no database yet).
    Works on a read-only cache (stores are then opened read-only).
    """
    root = Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        run_id = folder.name
        if not _RUN_ID.match(run_id):
            continue
        db = folder / DB_NAME
        if not db.is_file():
            if re.fullmatch(r"[0-9a-f]{8,64}", run_id):  # a run folder whose database was never written
                out.append(_problem(root, run_id, "empty", f"{folder} holds no {DB_NAME}; nothing was evaluated "
                                    "there. Delete the folder or run the command again."))
            continue
        store = RunStore(root, run_id)
        try:
            store._check()
            out.append(store.summary())
        except StoreDamaged as e:
            out.append(_problem(root, run_id, "damaged", str(e)))
        except (sqlite3.Error, OSError, StoreError, EnvironmentFault, json.JSONDecodeError, TypeError) as e:
            out.append(_problem(root, run_id, "unreadable", f"{db} cannot be read ({e}); check its permissions "
                                "and the disk, or delete the folder."))
    return sorted(out, key=lambda s: s.updated or 0.0, reverse=True)


def _problem(root: Path, run_id: str, status: str, problem: str) -> RunSummary:
    path = root / run_id / DB_NAME
    try:
        updated = (path if path.exists() else path.parent).stat().st_mtime
    except OSError:
        updated = None
    return RunSummary(run_id=run_id, path=str(path), model=None, data=None, n_layers=None, n_samples=0,
                      status=status, target=None, created=None, updated=updated, problem=problem)
