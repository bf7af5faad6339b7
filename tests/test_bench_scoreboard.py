"""bench.scoreboard at tiny size: rows for the full model, the decision and baselines, the JSON the checks
read, the best marks, and the markdown / CSV / Pareto chart it writes (into a temporary folder)."""

from __future__ import annotations

import csv
import json

from conftest import save_tiny_llama, write_words
from test_zeroshot import write_task_files


def test_scoreboard_on_a_tiny_model(tmp_path, capsys):
    from bench import scoreboard

    write_task_files(tmp_path / "cache")
    model = save_tiny_llama(tmp_path / "tiny", n_layers=4)
    write_words(tmp_path / "text.txt", 3000)
    out = scoreboard.main(["--model", str(model), "--data", str(tmp_path / "text.txt"), "--windows", "2",
                           "--seq-len", "16", "--masks", "10", "--ks", "1,2", "--methods", "decision,last,block-influence",
                           "--tasks", "piqa,arc_easy", "--limit", "2", "--lm-batch-size", "4", "--swaps", "0",
                           "--n-compare", "2", "--n-verify", "2", "--val-windows", "4", "--heldout-windows", "2",
                           "--boot", "200", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "res"),
                           "--name", "sb", "--json"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["rows"] == json.loads(json.dumps(out["rows"]))
    rows = out["rows"]
    assert [(r["method"], r["k"]) for r in rows] == [("full", 0), ("decision", 1), ("last", 1), ("block-influence", 1),
                                                    ("decision", 2), ("last", 2), ("block-influence", 2)]
    for r in rows:
        assert {"method", "k", "heldout_ppl", "mean_acc"} <= set(r) and r["heldout_ppl"] > 1 and 0 <= r["mean_acc"] <= 1
        assert len(r["removed"]) == r["k"]
    assert [r["removed"] for r in rows if r["method"] == "last"] == [[3], [2, 3]]
    for k in (1, 2):  # exactly one best per column within each k (ties marked '=')
        group = [r for r in rows if r["k"] == k]
        assert sum(r["marks"].get("heldout_ppl") == "*" for r in group) >= 1
        best = min(group, key=lambda r: r["heldout_ppl"])
        assert best["marks"]["heldout_ppl"] == "*"
    assert all("decision_minus_this" in r for r in rows if r["method"] in ("last", "block-influence"))
    assert rows[0]["marks"] == {}  # the full model is the reference, never "best"
    md = (tmp_path / "res" / "sb.md").read_text()
    assert "python -m bench.scoreboard" in md and "| decision | 1 |" in md
    table = list(csv.reader((tmp_path / "res" / "sb.csv").open()))
    assert table[0][0].startswith("# python -m bench.scoreboard") and len(table) == 2 + len(rows)
    assert "plotly" in (tmp_path / "res" / "sb_pareto.html").read_text().lower()
    assert (tmp_path / "res" / "sb_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the offline chart
