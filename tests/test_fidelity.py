"""engine.fidelity: work counting, subset scores, the ratio estimator and the completion rule (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import fidelity
from engine.evaluate import count_prefix_computations

W, T = 8, 16


def _game(n=400, L=10, seed=0):
    """Synthetic per-window losses: the mask's damage times a per-window sensitivity, plus noise."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, L)) < 0.7  # (n, L)
    damage = (~masks * rng.uniform(0.01, 0.3, L)).sum(1)  # (n,): per-token loss increase
    sens = rng.uniform(0.6, 1.4, W)  # (W,): some windows suffer more
    full = rng.uniform(3.0, 4.0, W) * T  # (W,)
    nll = full[None] + T * damage[:, None] * sens[None] * rng.lognormal(0, 0.1, (n, W))  # (n, W)
    tokens = np.full((n, W), T)
    return masks, nll, tokens, full


def _partial(nll, tokens, rows, k):
    nll, tokens = nll.copy(), tokens.copy()
    nll[np.ix_(rows, range(k, W))] = np.nan
    tokens[np.ix_(rows, range(k, W))] = 0
    return nll, tokens


def test_work_counts_layer_calls_and_leaves():
    masks = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=bool)
    calls = count_prefix_computations(masks)  # 3: layers 0, 1, then 2 after (0, 1)
    assert calls == 3
    assert fidelity.count_work(masks, W, T) == (3 + 3) * W * T  # three distinct masks -> three leaves
    assert fidelity.count_work(np.zeros((0, 3), bool), W, T) == 0
    assert fidelity.work(5, 2, 4, 10) == 280


def test_subset_scores_of_complete_rows_are_the_usual_scores():
    masks, nll, tokens, full = _game()
    score, flag = fidelity.subset_scores(nll, tokens, full)
    ppl = np.exp(nll.sum(1) / tokens.sum(1))
    ppl_full = np.exp(full.sum() / (W * T))
    np.testing.assert_allclose(score, ppl_full / ppl, rtol=1e-12)
    assert not flag.any()
    nll[3, 2] = np.inf
    score, flag = fidelity.subset_scores(nll, tokens, full)
    assert flag[3] and score[3] == 0.0 and flag.sum() == 1


def test_estimate_full_is_exact_for_complete_rows_and_close_for_partial_ones():
    masks, nll, tokens, full = _game()
    exact = fidelity.subset_scores(nll, tokens, full)[0]
    rows = np.arange(100, 400)
    pn, pt = _partial(nll, tokens, rows, 2)
    est = fidelity.estimate_full(pn, pt, full)
    assert est.complete[:100].all() and not est.complete[100:].any()
    np.testing.assert_array_equal(est.n_windows[100:], 2)
    np.testing.assert_allclose(est.score[:100], exact[:100], rtol=1e-12)
    assert (est.se[:100] == 0).all()
    assert (est.se[100:][~masks[100:].all(1)] > 0).all()  # only the full mask itself is known exactly
    # beta corrects the chosen windows' sensitivity: errors are smaller than with the raw subset score
    raw = fidelity.subset_scores(pn, pt, full)[0]
    err_est = np.abs(est.score[rows] - exact[rows])
    err_raw = np.abs(raw[rows] - exact[rows])
    assert err_est.mean() < err_raw.mean()
    # the standard errors are honest: about 90% of the errors fall within 1.645 se
    inside = (err_est <= 1.645 * est.se[rows]).mean()
    assert 0.8 <= inside <= 0.99, inside


def test_estimate_full_without_calibration_rows_is_wide():
    masks, nll, tokens, full = _game(n=50)
    pn, pt = _partial(nll, tokens, np.arange(50), 4)
    est = fidelity.estimate_full(pn, pt, full)
    (beta, tau2, n_cal), = est.beta.values()
    assert beta == 1.0 and n_cal == 0 and np.isnan(tau2)
    d = -np.log(est.score)
    np.testing.assert_allclose(est.se, est.score * np.sqrt(0.5) * np.abs(d), rtol=1e-12)


def test_fit_weights():
    w = fidelity.fit_weights(np.array([0.0, 0.1, 0.1, 0.3]))
    assert w[0] == 1.0 and w[1] == pytest.approx(0.5) and w[3] < w[1]
    np.testing.assert_array_equal(fidelity.fit_weights(np.zeros(3)), np.ones(3))


def test_to_complete_draws_each_size_at_random_and_is_seeded():
    masks, nll, tokens, full = _game()
    pn, pt = _partial(nll, tokens, np.arange(400), 2)
    est = fidelity.estimate_full(pn, pt, full)
    chosen = fidelity.to_complete(est, masks, 0.2, seed=1)
    assert len(set(chosen.tolist())) == len(chosen)
    kept = masks.sum(1)
    for k in np.unique(kept):
        rows = np.flatnonzero(kept == k)
        assert len(np.intersect1d(chosen, rows)) == int(np.ceil(0.2 * len(rows)))
    np.testing.assert_array_equal(fidelity.to_complete(est, masks, 0.2, seed=1), chosen)
    assert not np.array_equal(fidelity.to_complete(est, masks, 0.2, seed=2), chosen)
    # not the best rows: the picks' scores spread like the partial rows' scores
    assert est.score[chosen].min() < np.quantile(est.score, 0.25) < np.quantile(est.score, 0.75) < est.score[chosen].max()
    assert len(fidelity.to_complete(est, masks, 0.0)) == 0
    full_est = fidelity.estimate_full(nll, tokens, full)
    assert len(fidelity.to_complete(full_est, masks, 0.5)) == 0  # nothing partial


def test_plan_completion_reaches_the_share_of_all_rows():
    masks, nll, tokens, full = _game()
    pn, pt = _partial(nll, tokens, np.arange(300, 400), 2)  # 300 complete, 100 partial
    est = fidelity.estimate_full(pn, pt, full)
    assert len(fidelity.plan_completion(est, masks, 0.5)) == 0  # 75% are complete already
    pn, pt = _partial(nll, tokens, np.arange(0, 400), 2)
    est = fidelity.estimate_full(pn, pt, full)
    picks = fidelity.plan_completion(est, masks, 0.25)
    assert len(picks) == 100 and len(set(picks.tolist())) == 100


def test_real_rows_correct_with_complete_design_rows_only():
    """The regression adjustment's correction rows: complete design rows once there are enough."""
    from types import SimpleNamespace

    from engine.estimators import MIN_CORRECTION_ROWS, real_rows

    n = 60
    design = np.arange(n) % 4 != 0  # every 4th row chosen by an active round
    complete = np.arange(n) < 2 * MIN_CORRECTION_ROWS
    s = SimpleNamespace(design_rows=design, complete=complete, weights=np.ones(n))
    out = real_rows(s)
    np.testing.assert_array_equal(out["train_only"], ~(design & complete))
    few = SimpleNamespace(design_rows=design, complete=np.arange(n) < 5, weights=None)
    np.testing.assert_array_equal(real_rows(few)["train_only"], ~design)  # too few exact rows: all design rows
    assert real_rows(SimpleNamespace(design_rows=np.ones(n, bool), complete=None, weights=None))["train_only"] is None


def test_first_windows_are_consecutive_per_mask_deterministic_and_spread():
    from engine.fidelity import first_windows

    strings = [format(i, "010b") for i in range(400)]
    a = first_windows(strings, 8, 2, seed=3)
    assert a == first_windows(strings, 8, 2, seed=3)  # a pure function of (mask, seed)
    assert a[5:9] == first_windows(strings[5:9], 8, 2, seed=3)  # order and company do not matter
    assert a != first_windows(strings, 8, 2, seed=4)
    for w in a:
        assert len(w) == 2 and w == tuple(sorted(w)) and (w[1] - w[0]) % 8 in (1, 7)  # consecutive, wrapping
    starts = np.bincount([min(w) if w != (0, 7) else 7 for w in a], minlength=8)
    assert starts.min() > 20  # every start drawn (400 masks, 50 expected each)
    assert first_windows(strings[:3], 8, 0) == [tuple(range(8))] * 3 == first_windows(strings[:3], 8, 8)
