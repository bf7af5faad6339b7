"""Per-window losses: MaskEvaluator.window_losses agrees with perplexities; the store keeps them (schema 2+)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.evaluate import MaskEvaluator, ppl_from_window_losses


def _masks(L: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((n, L)) < 0.6
    m[0], m[1] = True, False  # full and empty
    m[2] = m[3]  # a duplicate
    return m


@pytest.mark.parametrize("sharing", [True, False])
def test_window_losses_give_the_perplexities(sharing, tiny_lm, tiny_windows):
    lm = tiny_lm("llama")
    masks = _masks(4, 10)
    ev = MaskEvaluator(lm, tiny_windows, prefix_sharing=sharing)
    ppl = ev.perplexities(masks)
    nll, tokens = ev.window_losses(masks)
    W, T = tiny_windows.input_ids.shape
    assert nll.shape == (10, W) and tokens.shape == (10, W) and np.all(tokens == T - 1)
    np.testing.assert_allclose(ppl_from_window_losses(nll, tokens), ppl, rtol=1e-12)
    # windows differ from each other (a real per-window split, not W copies of the mean)
    assert np.ptp(nll[0]) > 1e-3
    np.testing.assert_array_equal(nll[2], nll[3])
    full_nll, full_tokens = ev.full_window_losses()
    np.testing.assert_allclose(ppl_from_window_losses(full_nll, full_tokens), ev.ppl_full, rtol=1e-9)
    np.testing.assert_allclose(full_nll, nll[0], rtol=1e-9)


def test_window_losses_do_not_depend_on_batch_or_loss_chunks(tiny_lm, tiny_windows):
    lm = tiny_lm("gpt2")
    masks = _masks(4, 6, seed=1)
    ref = MaskEvaluator(lm, tiny_windows).window_losses(masks)[0]
    small = MaskEvaluator(lm, tiny_windows, batch_size=2, loss_chunk_elems=260 * 5).window_losses(masks)[0]
    np.testing.assert_allclose(small, ref, rtol=1e-6)
    # the windows one at a time: each row's loss is the loss of that window alone
    one = MaskEvaluator(lm, tiny_windows.input_ids[1:2]).window_losses(masks)[0]
    np.testing.assert_allclose(one[:, 0], ref[:, 1], rtol=1e-6)


def test_iter_window_losses_yields_each_index_once(tiny_lm, tiny_windows):
    ev = MaskEvaluator(tiny_lm("llama"), tiny_windows)
    masks = _masks(4, 9, seed=2)
    seen = list(ev.iter_window_losses(masks))
    assert sorted(i for i, *_ in seen) == list(range(9))
    for i, ppl, nll, tokens, seconds in seen:
        assert ppl == pytest.approx(float(ppl_from_window_losses(nll, tokens)), rel=1e-12) and seconds >= 0


# ---------------------------------------------------------------- store: schema 2 and migration

import json  # noqa: E402
import sqlite3  # noqa: E402

from engine import store as store_mod  # noqa: E402
from engine.errors import StoreError  # noqa: E402
from engine.store import RunStore  # noqa: E402

META = {"model": "tiny", "data": "t.txt", "n_layers": 4, "model_identity": "abc", "data_hash": "d"}

# The schema-1 layout exactly as version 1 of engine/store.py created it.
V1_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, json TEXT NOT NULL);
CREATE TABLE samples (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT, mask TEXT NOT NULL UNIQUE, kept INTEGER NOT NULL, ppl REAL,
    score REAL NOT NULL, nonfinite INTEGER NOT NULL, seconds REAL NOT NULL, created REAL NOT NULL);
CREATE TABLE artifacts (name TEXT PRIMARY KEY, json TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE lease (
    id INTEGER PRIMARY KEY CHECK (id = 1), pid INTEGER NOT NULL, hostname TEXT NOT NULL, token TEXT NOT NULL,
    started REAL NOT NULL, heartbeat REAL NOT NULL, target INTEGER, status TEXT NOT NULL,
    cancel INTEGER NOT NULL DEFAULT 0, message TEXT);
"""


def _v1_store(tmp_path, run_id="old"):
    d = tmp_path / run_id
    d.mkdir()
    con = sqlite3.connect(d / "run.sqlite")
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(V1_DDL)
    meta = {**META, "run_id": run_id, "schema": 1, "created": 1.0, "ppl_full": 10.0}
    con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    con.executemany("INSERT INTO samples(mask, kept, ppl, score, nonfinite, seconds, created) VALUES (?,?,?,?,?,?,?)",
                    [("1101", 3, 12.0, 10 / 12, 0, 0.1, 2.0), ("0110", 2, None, 0.0, 1, 0.1, 3.0)])
    con.execute("INSERT INTO artifacts VALUES ('fit', '{\"r2\": 0.9}', 4.0)")
    con.commit()
    con.close()
    return d / "run.sqlite"


def test_store_keeps_window_losses_with_the_row(tmp_path):
    store = RunStore.open(tmp_path, "run1", META)
    assert store.meta()["schema"] == store_mod.SCHEMA == 3
    with store.writer() as w:
        w.add("1100", 10.0, 0.5, False, 0.1, window_nll=[3.0, 4.5, 1.25], window_tokens=[7, 7, 7])
        w.add("1010", 11.0, 0.4, False, 0.1, window_nll=np.array([1.0, 2.0, 3.0]), window_tokens=np.array([7, 7, 6]))
        w.add("1100", 99.0, 0.1, False, 0.1, window_nll=[9.0, 9.0, 9.0], window_tokens=[7, 7, 7])  # ignored
    t = store.table()
    assert t.window_nll.shape == (2, 3) and t.window_nll.dtype == np.float64 and t.window_tokens.dtype == np.int64
    np.testing.assert_array_equal(t.window_nll[0], [3.0, 4.5, 1.25])
    np.testing.assert_array_equal(t.window_tokens[1], [7, 7, 6])
    with pytest.raises(StoreError, match="both"):
        with store.writer() as w:
            w.add("0011", 1.0, 1.0, False, 0.1, window_nll=[1.0])
    with pytest.raises(StoreError, match="one nll"):
        with store.writer() as w:
            w.add("0011", 1.0, 1.0, False, 0.1, window_nll=[1.0, 2.0], window_tokens=[3])
    assert store.count() == 2  # the refused adds left nothing behind


def test_rows_without_windows_make_the_arrays_none(tmp_path):
    store = RunStore.open(tmp_path, "run1", META)
    with store.writer() as w:
        w.add("1100", 10.0, 0.5, False, 0.1, window_nll=[3.0, 4.5], window_tokens=[7, 7])
        w.add("1010", 11.0, 0.4, False, 0.1)
    t = store.table()
    assert t.window_nll is None and t.window_tokens is None and len(t.score) == 2
    assert set(store.window_losses()) == {t.rowid[0]}


def test_version_1_store_is_migrated_and_keeps_working(tmp_path):
    path = _v1_store(tmp_path)
    store = RunStore.open(tmp_path, "old")
    meta = store.meta()
    assert meta["schema"] == 3 and meta["migrated_from"] == 1
    t = store.table()  # whole-mask perplexities as before, no per-window losses
    assert t.masks.tolist() == [[True, True, False, True], [False, True, True, False]]
    assert t.ppl[0] == 12.0 and np.isnan(t.ppl[1]) and t.nonfinite.tolist() == [False, True]
    assert t.window_nll is None and t.window_tokens is None
    assert store.get_artifact("fit") == {"r2": 0.9}
    # new rows get windows; the old rows still have none, so the table's arrays stay None
    with store.writer() as w:
        w.add("1111", 10.0, 1.0, False, 0.1, window_nll=[1.0, 2.0], window_tokens=[5, 5])
    assert store.table().window_nll is None and len(store.window_losses()) == 1
    # opening again is a no-op; the file is a plain schema-3 store now
    assert RunStore.open(tmp_path, "old").meta()["schema"] == 3
    assert [(r.round, r.source, r.windows, r.work) for r in store.results()] == [
        (0, "design", None, 0), (0, "design", None, 0), (0, "design", 2, 0)]
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    con.close()
    assert "window_losses" in tables


# The schema-2 layout exactly as version 2 of engine/store.py created it: schema 1 + window_losses.
V2_DDL = V1_DDL + """
CREATE TABLE window_losses (
    sample_rowid INTEGER PRIMARY KEY REFERENCES samples(rowid), n_windows INTEGER NOT NULL, nll BLOB NOT NULL,
    tokens BLOB NOT NULL);
"""


def _v2_store(tmp_path, run_id="old2"):
    d = tmp_path / run_id
    d.mkdir()
    con = sqlite3.connect(d / "run.sqlite")
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(V2_DDL)
    meta = {**META, "run_id": run_id, "schema": 2, "created": 1.0, "ppl_full": 10.0,
            "window_losses_full": {"nll": [20.0, 21.0], "tokens": [9, 9]}}
    con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    con.executemany("INSERT INTO samples(mask, kept, ppl, score, nonfinite, seconds, created) VALUES (?,?,?,?,?,?,?)",
                    [("1101", 3, 12.0, 10 / 12, 0, 0.1, 2.0), ("0110", 2, 15.0, 10 / 15, 0, 0.1, 3.0)])
    con.execute("INSERT INTO window_losses VALUES (1, 2, ?, ?)",
                (np.array([22.0, 23.0], "<f8").tobytes(), np.array([9, 9], "<i8").tobytes()))
    con.execute("INSERT INTO artifacts VALUES ('fit:x', '{\"n_masks\": 2}', 4.0)")
    con.commit()
    con.close()
    return d / "run.sqlite"


def test_status_lists_a_version_2_store_before_it_is_migrated(tmp_path):
    from engine.store import list_runs

    _v2_store(tmp_path)
    (run,) = list_runs(tmp_path)
    assert run.problem is None and run.n_samples == 2 and run.work == 0 and run.rounds == {}


def test_version_2_store_is_migrated_and_keeps_working(tmp_path):
    """Schema 2 -> 3: rows keep their numbers and windows, gain round 0 / source design / work 0; new rows
    carry their round and source; an artifact of schema 2 (no window count) is compared on masks only."""
    from engine import pipeline

    path = _v2_store(tmp_path)
    store = RunStore.open(tmp_path, "old2")
    assert store.meta()["schema"] == 3 and store.meta()["migrated_from"] == 2
    rows = store.results()
    assert [(r.mask, r.ppl, r.round, r.source, r.windows, r.work, r.completed) for r in rows] == [
        ("1101", 12.0, 0, "design", 2, 0, None), ("0110", 15.0, 0, "design", None, 0, None)]
    assert store.evaluated_windows() == 2 and not pipeline.stored(store, "fit", pipeline.MethodSpec())
    assert pipeline._stale({"n_masks": 2}, store) is False
    with store.writer() as w:
        w.add("1111", 10.0, 1.0, False, 0.1, window_nll=[1.0, np.nan], window_tokens=[5, 0], round=1,
              source="active", work=40)
    t = store.table()
    assert t.round.tolist() == [0, 0, 1] and t.source.tolist() == ["design", "design", "active"]
    assert t.windows.tolist() == [2, -1, 1] and t.work.tolist() == [0, 0, 40]
    summary = store.summary()
    assert summary.partial == 1 and summary.work == 40 and summary.rounds == {0: {"masks": 2, "active": 0},
                                                                              1: {"masks": 1, "active": 1}}
    assert RunStore.open(tmp_path, "old2").meta()["schema"] == 3  # idempotent
    con = sqlite3.connect(path)
    cols = {r[1] for r in con.execute("PRAGMA table_info(samples)")}
    con.close()
    assert {"round", "source", "windows", "work", "completed"} <= cols


def test_complete_fills_only_missing_windows(tmp_path):
    """Writer.complete: fills the missing windows, recomputes ppl / score over the evaluated ones in the same
    transaction, refuses to change an evaluated window, accepts the same value again."""
    from engine import pipeline
    from engine.fidelity import subset_scores

    store = RunStore.open(tmp_path, "run1", META)
    full_nll, tok = np.array([20.0, 21.0, 22.0]), np.array([7, 7, 7])
    store.set_meta(window_losses_full={"nll": full_nll.tolist(), "tokens": tok.tolist()})
    with store.writer() as w:
        w.add("1100", 1.0, 0.9, False, 0.1, window_nll=[25.0, np.nan, np.nan], window_tokens=[7, 0, 0], work=10)
        assert store.results()[0].windows == 1 and store.evaluated_windows() == 1
        seen = pipeline._seen(store)  # what an artifact computed now records
        assert seen == {"n_masks": 1, "n_windows_evaluated": 1} and not pipeline._stale(seen, store)
        ppl, score = w.complete("1100", [np.nan, 26.0, 27.0], [0, 7, 7], seconds=0.5, work=20)
        assert pipeline._stale(seen, store)  # the completion made it stale (same mask count)
        with pytest.raises(StoreError, match="refusing to change evaluated windows \\[0\\]"):
            w.complete("1100", [24.0, np.nan, np.nan], [7, 0, 0])
        w.complete("1100", [25.0, 26.0, 27.0], [7, 7, 7])  # the same values: accepted, nothing changes
    r = store.results()[0]
    nll = np.array([25.0, 26.0, 27.0])
    assert r.windows == 3 and r.work == 20 + 10 and r.completed is not None and r.seconds == pytest.approx(0.6)
    assert ppl == r.ppl == pytest.approx(np.exp(nll.sum() / 21), rel=1e-12)
    assert score == r.score == pytest.approx(subset_scores(nll[None], tok[None], full_nll, tok)[0][0], rel=1e-12)
    np.testing.assert_array_equal(store.table().window_nll[0], nll)
    assert store.evaluated_windows() == 3


def test_newer_schema_is_refused(tmp_path):
    store = RunStore.open(tmp_path, "run1", META)
    store.set_meta(schema=4)
    with pytest.raises(StoreError, match="schema 4, expected 3"):
        RunStore.open(tmp_path, "run1")


def test_sample_writes_window_losses(tmp_path, tiny_lm, tiny_windows, monkeypatch):
    """pipeline.sample stores each mask's per-window losses with its row (and the full model's in meta)."""
    from engine import pipeline
    from engine.config import RunSpec, SamplingSpec
    from engine.evaluate import MaskEvaluator

    lm = tiny_lm("llama")
    spec = RunSpec(sampling=SamplingSpec(n_masks=6, seed=0))
    store = RunStore.open(tmp_path, "s", {**META, "n_layers": 4})
    run = pipeline.OpenRun(spec=spec, lm=lm, windows=tiny_windows, run_id="s", store=store)
    result = pipeline.sample(spec, tmp_path, progress=False, run=run)
    assert result.evaluated == 6
    t = store.table()
    W = tiny_windows.input_ids.shape[0]
    assert t.window_nll.shape == (6, W)
    np.testing.assert_allclose(ppl_from_window_losses(t.window_nll, t.window_tokens), t.ppl, rtol=1e-12)
    want = MaskEvaluator(lm, tiny_windows, prefix_sharing=False).window_losses(t.masks)[0]
    np.testing.assert_allclose(t.window_nll, want, rtol=1e-5)
    full = store.meta()["window_losses_full"]
    np.testing.assert_allclose(ppl_from_window_losses(full["nll"], full["tokens"]), store.meta()["ppl_full"], rtol=1e-12)


def test_validation_windows_do_not_overlap_the_calibration_windows():
    from engine.config import DataSpec
    from engine.data import make_windows, validation_windows
    from engine.errors import DataError

    class Positions:  # token id = position in the text: overlap shows as shared ids
        def __call__(self, text, **_):
            return {"input_ids": list(range(len(text)))}

        def get_vocab(self):
            return {"x": 0}

    spec = DataSpec(source="x", n_windows=5, seq_len=16, seed=3)
    text = "a" * 1000
    cal = make_windows(Positions(), spec, text=text)
    val = validation_windows(Positions(), spec, 20, text=text)
    assert val.input_ids.shape == (20, 16)
    assert not set(cal.input_ids.flatten().tolist()) & set(val.input_ids.flatten().tolist())
    assert len(set(val.input_ids.flatten().tolist())) == 20 * 16  # distinct windows
    with pytest.raises(DataError, match="do not overlap"):
        validation_windows(Positions(), spec, 60, text=text)


def test_window_losses_of_the_batched_walk(tiny_lm, tiny_windows):
    """The layer-by-layer batched walk yields each mask right after its leaf: same per-window losses."""
    lm = tiny_lm("llama")
    masks = _masks(4, 12, seed=3)
    ref = MaskEvaluator(lm, tiny_windows).window_losses(masks)[0]
    batched = MaskEvaluator(lm, tiny_windows, batch_masks=True, batch_states=3)
    nll, tokens = batched.window_losses(masks)
    np.testing.assert_allclose(nll, ref, rtol=1e-5)
    np.testing.assert_allclose(ppl_from_window_losses(nll, tokens), batched.perplexities(masks), rtol=1e-12)
