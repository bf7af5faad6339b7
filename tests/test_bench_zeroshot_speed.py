"""bench.zeroshot_speed at tiny size: A/B rows per task and limit with both scorers agreeing request by request,
token counts (the shared scorer runs fewer tokens on multiple-choice tasks), the projection, the JSON file."""

from __future__ import annotations

import json

from conftest import save_tiny_llama
from test_zeroshot import N, write_task_files


def test_zeroshot_speed_on_a_tiny_model(tmp_path, capsys):
    from bench import zeroshot_speed

    write_task_files(tmp_path / "cache")
    model = save_tiny_llama(tmp_path / "tiny", n_layers=3)
    out = zeroshot_speed.main(["--model", str(model), "--tasks", "hellaswag,lambada_openai", "--limits", "2,3",
                               "--project", "10", "--lm-batch-size", "4", "--cache-dir", str(tmp_path / "cache"),
                               "--out", str(tmp_path / "res" / "speed.json"), "--json"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["totals"] == json.loads(json.dumps(out["totals"]))
    rows = out["per_task"]
    assert [(r["tasks"], r["limit"]) for r in rows] == [(["hellaswag"], 2), (["lambada_openai"], 2),
                                                       (["hellaswag"], 3), (["lambada_openai"], 3)]
    assert [r["order"][0] for r in rows] == ["hflm", "shared", "hflm", "shared"]  # alternating
    for r in rows:
        assert r["acc_equal"] and r["correct_equal"] and r["greedy_equal"] and r["max_abs_loglik_diff"] < 1e-4
        assert r["requests_compared"] == r["tokens"]["requests"] == r["hflm"]["n_requests"]
        assert r["shared"]["scorer"] == "shared" and r["hflm"]["scorer"] == "hflm"
        assert 0 <= r["shared"]["scoring_seconds"] <= r["shared"]["seconds"] > 0
    hs = rows[2]["tokens"]
    assert hs["docs"] == N and hs["requests"] == 4 * N and hs["trees"] == 1  # the test's N documents are identical
    assert hs["shared_tokens"] < hs["hflm_tokens"] <= hs["hflm_padded_tokens"]  # 4 endings share one context
    assert hs["shared_lm_head_positions"] * N == hs["continuation_tokens"]  # scored once for the N copies
    lam = rows[3]["tokens"]
    # one request per document: the tree runs its whole input ((context + continuation)[:-1])
    assert lam["shared_tokens"] == lam["context_tokens"] + lam["continuation_tokens"] - lam["requests"]
    proj = out["projection"]
    assert set(proj) == {"hellaswag", "lambada_openai", "total"}
    for r in rows[2:]:  # the fitted line goes through the largest limit measured
        p = proj[r["tasks"][0]]["shared"]
        assert p["fixed_s"] + p["per_item_s"] * 3 == __import__("pytest").approx(r["shared"]["seconds"], abs=0.01)
    assert json.loads((tmp_path / "res" / "speed.json").read_text())["limits"] == [2, 3]
