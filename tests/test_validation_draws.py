"""bench.validation_draws on a synthetic table: the rules pick what they should."""

from __future__ import annotations

import numpy as np

from bench import validation_draws as vd


class _Table:  # the one GroundTruth method the draws read: the `top` best sets per k, best first
    def optimum(self, k, top=10):
        return [(tuple(range(i, i + k)), 0.0) for i in range(top)]


def test_validation_picks_the_heldout_best_when_the_texts_agree():
    near, W = 3, 6
    sets = sorted({s for k in vd.KS for s, _ in _Table().optimum(k, near)})
    per_set = {s: (2.0 if s[0] == 0 else 1.0 if s[0] == 1 else 3.0) for s in sets}  # set 1 best, calibration-best 0
    nll = np.array([[per_set[s]] * W for s in sets])  # (c, W) the same loss per window
    tok = np.full_like(nll, 10, dtype=np.int64)
    d = {"sets": np.array([",".join(map(str, s)) for s in sets]), "val_nll": nll, "val_tok": tok,
         "testall_nll": nll, "testall_tok": tok, "test8_nll": nll[:, :2] * 1.0, "test8_tok": tok[:, :2]}
    rows = {(r["val_windows"], r["heldout"]): r for r in vd.draws(_Table(), d, near, [2], n_draws=5)}
    assert rows[(2, "testall")]["share_all_k"] == 1.0 and rows[(2, "testall")]["draws"] == 5
    assert rows[(W, "test8")]["mean_ratio"] == {k: 1.0 for k in vd.KS}
    calib = rows[(0, "testall")]["mean_ratio"]  # the calibration-best set (set 0) pays exp(0.1) per token
    assert all(abs(v - np.exp(0.1)) < 1e-3 for v in calib.values()) and rows[(0, "testall")]["share_all_k"] == 0.0
    assert rows[(-1, "testall")]["share_all_k"] == 1.0


def test_losses_reads_the_cache_without_the_model_when_it_holds_every_set(tmp_path):
    sets = [(0, 1), (2,), (1, 3)]
    d = {"sets": np.array([",".join(map(str, s)) for s in sets]), "val_nll": np.ones((3, 4)),
         "val_tok": np.full((3, 4), 5)}
    path = tmp_path / "cache.npz"
    np.savez(path, **d)
    got = vd.losses(None, {(2,), (1, 3)}, path)  # a subset: nothing to compute, no model, no ground truth
    assert got["sets"].tolist() == ["0,1", "2", "1,3"] and vd._index(got) == {(0, 1): 0, (2,): 1, (1, 3): 2}
    np.testing.assert_allclose(vd._ppl(got, "val", [0, 1], [0, 1]), np.exp(0.2))
