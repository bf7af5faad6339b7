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
* Where the code lives: the tables, the records and the BLOB packing in engine/store_schema.py, the
  writer (lease, heartbeat, ``add``, ``complete``) in engine/store_writer.py, opening, reading and
  listing runs here. Callers import everything from this module.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import numpy as np

from engine.config import default_cache_dir
from engine.errors import EnvironmentFault, ReadOnlyLocation, StoreDamaged, StoreError, from_exception
from engine.store_schema import (DB_NAME, DDL, MIGRATABLE, QUICK_CHECK_MAX_BYTES, RUN_ID, SAMPLE_COLUMNS, SCHEMA,
                                 TABLES, V3_COLUMNS, Lease, RunSummary, Sample, SampleTable, check_run_id, dumps,
                                 unpack_windows)
from engine.store_schema import LEASE_TIMEOUT_S, SOURCES, pid_alive  # noqa: F401 (re-exported: callers read them here)
from engine.store_writer import Writer

_BUSY_TIMEOUT_MS = 10_000


class RunStore:
    """A handle on one run's database (see the module contract)."""

    def __init__(self, cache_dir: str | os.PathLike | None, run_id: str):
        self.cache_dir = Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir()
        self.run_id = check_run_id(run_id)
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
            for statement in DDL.split(";"):
                if statement.strip():
                    con.execute(statement)  # CREATE TABLE IF NOT EXISTS: only the new table is created
            have = {r[1] for r in con.execute("PRAGMA table_info(samples)")}
            for name, declaration in V3_COLUMNS:
                if name not in have:
                    con.execute(f"ALTER TABLE samples ADD COLUMN {name} {declaration}")
            con.execute("UPDATE samples SET windows = (SELECT n_windows FROM window_losses "
                        "WHERE sample_rowid = samples.rowid) WHERE windows IS NULL")
            con.execute("INSERT OR REPLACE INTO meta(key, json) VALUES ('schema', ?)", (dumps(SCHEMA),))
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
            for statement in DDL.split(";"):
                if statement.strip():
                    con.execute(statement)
            rows = {**meta, "run_id": self.run_id, "schema": SCHEMA, "created": meta.get("created", time.time())}
            con.executemany(
                "INSERT OR IGNORE INTO meta(key, json) VALUES (?, ?)", [(k, dumps(v)) for k, v in rows.items()]
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
                "INSERT OR REPLACE INTO meta(key, json) VALUES (?, ?)", [(k, dumps(v)) for k, v in values.items()]
            )

    def put_artifact(self, name: str, obj) -> None:
        with self._write() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts(name, json, created) VALUES (?, ?, ?)",
                (name, dumps(obj), time.time()),
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
                f"SELECT {SAMPLE_COLUMNS} FROM samples WHERE rowid > ? ORDER BY rowid", (since_rowid,),
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
        return {r[0]: unpack_windows(r[1], r[2], r[3]) for r in rows}

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
        if not RUN_ID.match(run_id):
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
