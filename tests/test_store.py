"""Run store contract: per-row commits, resume, concurrent readers, one live writer, cancel."""

import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engine import store as store_mod
from engine import store_writer
from engine.errors import StoreError, StoreLocked
from engine.store import RunStore, list_runs

META = {"model": "tiny", "data": "t.txt", "n_layers": 4, "model_identity": "abc", "data_hash": "d"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    return RunStore.open(tmp_path, "run1", META)


def test_create_meta_and_wal(store, tmp_path):
    assert store.path == tmp_path.resolve() / "run1" / "run.sqlite"
    meta = store.meta()
    assert meta["model"] == "tiny" and meta["run_id"] == "run1" and meta["schema"] == store_mod.SCHEMA
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
    store.set_meta(ppl_full=12.5)
    assert RunStore.open(tmp_path, "run1").meta()["ppl_full"] == 12.5


def test_missing_run_and_bad_ids(tmp_path):
    with pytest.raises(StoreError, match="sample"):
        RunStore.open(tmp_path, "nope")
    for bad in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(StoreError, match="invalid run id"):
            RunStore(tmp_path, bad)
    assert not (tmp_path / "nope").exists()


def test_each_row_is_visible_to_a_reader_while_the_writer_is_open(store, tmp_path):
    reader = RunStore.open(tmp_path, "run1")
    with store.writer(target=3) as w:
        w.add("1100", 10.0, 0.5, False, 0.1)
        rows = reader.results()
        assert [r.mask for r in rows] == ["1100"]
        w.add("1010", float("inf"), 0.0, True, 0.1)
        new = reader.results(since_rowid=rows[-1].rowid)
        assert [(r.mask, r.nonfinite, r.kept) for r in new] == [("1010", True, 2)]
        assert reader.lease().status == "running"
    assert reader.lease().status == "finished"
    assert reader.summary().n_samples == 2


def test_resume_skips_done_masks_and_never_duplicates(store):
    with store.writer() as w:
        w.add("1100", 10.0, 0.5, False, 0.1)
    first = store.results()[0]
    with store.writer() as w:
        assert store.done_masks() == {"1100"}
        w.add("1100", 99.0, 0.1, False, 0.1)  # ignored: already evaluated
        w.add("0110", float("nan"), 0.0, True, 0.1)
    rows = store.results()
    assert rows[0] == first
    assert len(rows) == 2 and math.isnan(rows[1].ppl)
    table = store.table()
    assert table.masks.shape == (2, 4) and table.masks[0].tolist() == [True, True, False, False]
    assert table.nonfinite.tolist() == [False, True]


def test_second_writer_refused_while_first_alive(store, tmp_path):
    with store.writer(target=5):
        with pytest.raises(StoreLocked) as info:
            with RunStore.open(tmp_path, "run1").writer():
                pass
        msg = str(info.value)
        assert str(os.getpid()) in msg and socket.gethostname() in msg and "kill" in msg
    with store.writer():  # released: allowed again
        pass


def test_cancel_flag(store, tmp_path):
    assert not store.request_cancel()  # nothing running
    with store.writer() as w:
        assert not w.cancel_requested()
        assert RunStore.open(tmp_path, "run1").request_cancel()
        assert w.cancel_requested()
        w.cancelled = True
    assert store.lease().status == "cancelled"
    with store.writer() as w:  # a new writer starts with the flag cleared
        assert not w.cancel_requested()


def test_exit_status_on_errors(store):
    with pytest.raises(RuntimeError):
        with store.writer():
            raise RuntimeError("boom")
    assert store.lease().status == "failed" and "boom" in store.lease().message
    with pytest.raises(KeyboardInterrupt):
        with store.writer():
            raise KeyboardInterrupt
    assert store.lease().status == "cancelled"


def test_heartbeat_advances(store, monkeypatch):
    monkeypatch.setattr(store_writer, "HEARTBEAT_S", 0.05)
    with store.writer():
        t0 = store.lease().heartbeat
        time.sleep(0.3)
        assert store.lease().heartbeat > t0


def _fake_lease(store, hostname, heartbeat, pid=1):
    with store._write() as con:
        con.execute(
            "INSERT OR REPLACE INTO lease(id, pid, hostname, token, started, heartbeat, target, status, cancel) "
            "VALUES (1, ?, ?, 'x', ?, ?, 10, 'running', 0)",
            (pid, hostname, heartbeat, heartbeat),
        )


def test_lease_from_another_host_expires_by_heartbeat(store):
    _fake_lease(store, "elsewhere", time.time())
    with pytest.raises(StoreLocked, match="elsewhere"):
        with store.writer():
            pass
    assert store.summary().status == "running"
    _fake_lease(store, "elsewhere", time.time() - store_mod.LEASE_TIMEOUT_S - 1)
    assert store.summary().status == "died"
    with store.writer():
        pass


def test_writer_that_lost_its_lease_stops(store):
    with pytest.raises(StoreLocked, match="lost its lease"):
        with store.writer() as w:
            _fake_lease(store, "elsewhere", time.time())  # someone else took over
            w.add("1000", 1.0, 1.0, False, 0.0)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from engine.store import RunStore
    store = RunStore.open(sys.argv[1], "run1")
    with store.writer(target=100) as w:
        for i in range(3):
            w.add(format(i + 1, "04b"), 10.0 + i, 0.5, False, 0.01)
        print("ready", flush=True)
        time.sleep(60)
    """
)


def test_writer_killed_with_sigkill_frees_the_lease_and_keeps_rows(store, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLocked, match=str(proc.pid)):
            with store.writer():
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)  # reaped: the pid is gone, so the lease is dead at once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert store.summary().status == "died"
    assert [r.mask for r in store.results()] == ["0001", "0010", "0011"]
    with store.writer() as w:
        w.add("1111", 5.0, 1.0, False, 0.01)
    assert store.count() == 4


def test_artifacts(store):
    assert store.get_artifact("fit") is None
    store.put_artifact("fit", {"r2": 0.9, "values": [1, 2]})
    store.put_artifact("fit", {"r2": 0.95})
    assert store.get_artifact("fit") == {"r2": 0.95}
    assert store.artifact_names() == ["fit"]


def test_list_runs(tmp_path):
    assert list_runs(tmp_path / "missing") == []
    a = RunStore.open(tmp_path, "a", META)
    RunStore.open(tmp_path, "b", {**META, "model": "other"})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "run.sqlite").write_text("not a database")
    with a.writer(target=7) as w:
        w.add("1100", 10.0, 0.5, False, 0.1)
    runs = {r.run_id: r for r in list_runs(tmp_path)}
    assert set(runs) == {"a", "b", "junk"}  # every run folder is listed, readable or not
    assert runs["junk"].status == "damaged" and "delete" in runs["junk"].problem.lower()
    assert runs["a"].problem is None
    assert runs["a"].n_samples == 1 and runs["a"].status == "finished" and runs["a"].target == 7
    assert runs["b"].status == "new" and runs["b"].model == "other" and runs["b"].n_layers == 4
    assert [r.run_id for r in list_runs(tmp_path) if r.problem is None][0] == "a"  # most recently updated first
    assert np.isfinite(runs["a"].updated)
