"""Non-finite values: stored and flagged, never dropped; a NaN model stops before sampling."""

import math
import sqlite3

import pytest

from engine.errors import InternalError
from engine.store import RunStore
from faults.helpers import FAST_FIT, lease_status, model_args, rows

META = {"model": "m", "n_layers": 4}


@pytest.mark.parametrize("ppl,score,flag", [(100.0, math.nan, False), (math.nan, math.nan, True),
                                            (math.inf, math.inf, True), (math.nan, 0.5, False)])
def test_writer_refuses_a_row_it_would_drop(tmp_path, ppl, score, flag):
    store = RunStore.open(tmp_path, "r", META)
    with store.writer() as w:
        assert w.add("1111", 10.0, 1.0, False, 0.1) >= 1
        with pytest.raises(InternalError, match="refusing to store mask '1101'"):
            w.add("1101", ppl, score, flag, 0.1)
    assert [r[1] for r in rows(store.path)] == ["1111"]
    assert lease_status(store.path) == "finished"  # refused inside the block, caught by the test: lease released


def test_nonfinite_perplexity_is_stored_with_its_flag(tmp_path):
    store = RunStore.open(tmp_path, "r", META)
    with store.writer() as w:
        a = w.add("1100", math.inf, 0.0, True, 0.1)
        b = w.add("1010", math.nan, 0.0, True, 0.1)
        assert w.add("1100", 5.0, 0.9, False, 0.1) == a  # a mask is never stored twice: the first row stays
    table = store.table()
    assert list(table.rowid) == [a, b] and table.nonfinite.all() and (table.score == 0).all()
    assert math.isinf(table.ppl[0]) and math.isnan(table.ppl[1])


def test_the_table_itself_refuses_null_scores(tmp_path):
    """The constraint that would fire if Writer.add's check were bypassed: loud, not silent."""
    store = RunStore.open(tmp_path, "r", META)
    con = sqlite3.connect(store.path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("INSERT INTO samples(mask, kept, ppl, score, nonfinite, seconds, created) "
                        "VALUES ('1101', 3, 100.0, NULL, 0, 0.1, 0) ON CONFLICT(mask) DO NOTHING")
        with pytest.raises(sqlite3.IntegrityError):  # NULL perplexity without the flag
            con.execute("INSERT INTO samples(mask, kept, ppl, score, nonfinite, seconds, created) "
                        "VALUES ('1101', 3, NULL, 0.0, 0, 0.1, 0)")
    finally:
        con.close()


def test_nan_model_stops_before_sampling_naming_the_layer(models, tmp_path, cli, record):
    code, out, err, js = cli("run", *model_args(models, "nan4"), "--masks", "8", "--remove", "2", *FAST_FIT,
                             "--cache-dir", tmp_path, "--out", tmp_path / "out")
    assert code == 4, err
    assert js["kind"] == "model_data" and js["type"] == "NonFiniteModel" and js["error"] == js["message"]
    msg = js["message"]
    assert "model.layers.2.mlp.down_proj.weight" in msg and "layer 2" in msg and "nothing was sampled" in msg
    (db,) = tmp_path.glob("*/run.sqlite")
    assert rows(db) == [] and lease_status(db) == "failed"  # no row, lease released
    assert not (tmp_path / "out").exists()
    # Again: the same refusal, not an endless re-evaluation of the same masks.
    code2, _, _, js2 = cli("sample", *model_args(models, "nan4"), "--masks", "8", "--cache-dir", tmp_path)
    assert code2 == 4 and js2["type"] == "NonFiniteModel" and rows(db) == []
