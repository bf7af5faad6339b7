"""engine.jobs: reading a job's progress and result from the end of its log."""

from __future__ import annotations

import json

from engine import jobs


def test_a_result_line_longer_than_the_tail_window_is_read_whole(tmp_path):
    log = tmp_path / "job.log"
    result = {"matrix": [[0.123456789] * 300] * 300}  # ~1 MB on one line, far over TAIL_BYTES
    log.write_text("noise\n" * 10 + json.dumps({"event": "progress", "done": 1}) + "\n" + json.dumps(result) + "\n")
    lines = jobs._tail_lines(log)
    assert json.loads(lines[-1]) == result
    small = tmp_path / "small.log"
    small.write_text("a\nb\n{}\n")  # window 3 holds "{}\n" only: widened to 6 bytes, "a" stays out
    assert jobs._tail_lines(small, window=3) == ["", "b", "{}"]
    assert jobs._tail_lines(small, window=2)[-1] == "{}"
    assert jobs._tail_lines(tmp_path / "missing.log") == []
