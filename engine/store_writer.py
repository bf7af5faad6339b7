"""The single writer of a run store (engine/store.py has the contract): `Writer` holds the lease,
refreshes its heartbeat from a background thread, commits one row per evaluated mask (`add`) and fills
a partial row's missing windows (`complete`). `RunStore.writer(target)` makes one; it reaches the
database through the store's own connection helpers."""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import threading
import time
import uuid

import numpy as np

from engine.errors import InternalError, StoreError, StoreLocked
from engine.store_schema import (LEASE_TIMEOUT_S, SOURCES, Lease, count_evaluated, pack_windows, subset_ppl,
                                 unpack_windows)

HEARTBEAT_S = 2.0  # seconds between the writer's heartbeats (a lease expires after LEASE_TIMEOUT_S)


class Writer:
    """The single writer of a run: holds the lease, heartbeats, commits one row per mask."""

    def __init__(self, store: "RunStore", target: int | None):  # engine.store.RunStore
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
        packed = None if window_nll is None else pack_windows(window_nll, window_tokens)
        n_evaluated = None if window_tokens is None else count_evaluated(window_tokens)
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
            nll, tok = unpack_windows(W, row[2], row[3])
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
            ppl = subset_ppl(nll, tok)
            _, nll_bytes, tok_bytes = pack_windows(nll, tok)
            con.execute("UPDATE window_losses SET nll = ?, tokens = ? WHERE sample_rowid = ?",
                        (nll_bytes, tok_bytes, rowid))
            con.execute("UPDATE samples SET ppl = ?, score = ?, nonfinite = ?, windows = ?, seconds = seconds + ?, "
                        "work = work + ?, completed = ? WHERE rowid = ?",
                        (None if np.isnan(ppl) else ppl, float(score[0]), int(bool(flag[0])), count_evaluated(tok),
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
