"""The method's stages on a real (tiny) run: fit -> contributions -> decide -> export, and `engine run`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_llama
from engine import cli, estimators, method, pipeline
from engine.config import DataSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec, SurrogateSpec
from engine.errors import EstimationError, WorkbenchError
from engine.estimators import BANZHAF_VALUE, ESTIMATORS, SHAPLEY_VALUE, STRATA_SEMIVALUE

TEXT = " ".join(f"Layer {i} of the model reads the stream and writes a small update back." for i in range(300))
L = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("method")
    (root / "text.txt").write_text(TEXT)
    save_tiny_llama(root / "tiny", n_layers=L, seed=0)
    spec = RunSpec(
        model=ModelSpec(name=str(root / "tiny")),
        data=DataSpec(source=str(root / "text.txt"), n_windows=2, seq_len=16),
        sampling=SamplingSpec(scheme="size-uniform", n_masks=48, seed=0),
    )
    pipeline.sample(spec, cache_dir=root / "cache", progress=False)
    run = pipeline.open_run(spec, root / "cache")
    return root, spec, run


RIDGE = SurrogateSpec(kind="ridge-pairwise", ensemble=2)


def test_fit_reports_heldout_metrics_and_saves_them_under_its_spec(setup):
    _, spec, run = setup
    s = pipeline.samples(run)
    f = method.fit(s, RIDGE)
    assert set(f.headline) >= {"r2", "spearman", "mae", "mae_ppl"}
    assert f.summary["n_masks"] == 48 and "learning_curve" in f.summary
    assert f.summary["report"]["test"]["overall"]["n"] == len(f.fitted.report.split.test)
    # The pipeline stores it keyed by the surrogate spec: another spec's fit never replaces it.
    out = pipeline.fit(run, MethodSpec(surrogate=RIDGE))
    other = pipeline.fit(run, MethodSpec(surrogate=dataclasses.replace(RIDGE, seed=1)))
    saved = pipeline.stored(run, "fit", MethodSpec(surrogate=RIDGE))
    assert saved["r2"] == out["r2"] and saved["n_masks"] == 48 and not saved["stale"]
    assert "learning_curve" in saved
    assert pipeline.stored(run, "fit", MethodSpec(surrogate=dataclasses.replace(RIDGE, seed=1)))["r2"] == other["r2"]
    # Contributions reuse the fit and do not overwrite the stored one (learning curve kept).
    pipeline.contributions(run, MethodSpec(surrogate=RIDGE, estimator="exact"))
    assert "learning_curve" in pipeline.stored(run, "fit", MethodSpec(surrogate=RIDGE))


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_gives_one_value_per_layer_with_error_bars(setup, estimator):
    _, spec, run = setup
    s = pipeline.samples(run)
    f = method.fit(s, RIDGE, curve=False)
    mspec = MethodSpec(surrogate=RIDGE, estimator=estimator, budget=2000)
    c = method.contributions(s, f, mspec)
    assert c.values.shape == (L,) and np.all(np.isfinite(c.values))
    assert c.stderr is not None and c.stderr.shape == (L,)
    assert c.details["estimand"] in (SHAPLEY_VALUE, STRATA_SEMIVALUE, BANZHAF_VALUE)
    stored = pipeline.contributions(run, mspec)
    assert stored["contributions"] == pytest.approx(list(c.values))  # the pipeline gives the same numbers
    assert pipeline.stored(run, "contributions", mspec)["key"] == estimator
    # every estimator's --json carries a 90% interval around its value, and says what it is for
    assert stored["level"] == 0.9 and len(stored["ci_low"]) == len(stored["ci_high"]) == L
    assert np.all(np.array(stored["ci_low"]) <= c.values) and np.all(c.values <= np.array(stored["ci_high"]))
    assert np.all(np.array(stored["ci_high"]) - np.array(stored["ci_low"]) > 0)
    assert stored["interval_estimand"].split()[0] in ("Shapley", "restricted-strata", "Banzhaf")
    if estimator == "paper":
        assert "restricted-strata semivalue" in c.estimator
    if estimator == "exact":  # efficiency on the surrogate holds exactly for exact Shapley
        assert abs(c.details["efficiency"]["gap"]) < 1e-6


def test_monte_carlo_seed_is_separate_from_the_surrogate_seed(setup):
    _, _, run = setup
    s = pipeline.samples(run)
    f = method.fit(s, RIDGE, curve=False)
    a = method.contributions(s, f, MethodSpec(surrogate=RIDGE, estimator="paper", budget=700, mc_seed=0))
    b = method.contributions(s, f, MethodSpec(surrogate=RIDGE, estimator="paper", budget=700, mc_seed=1))
    assert not np.allclose(a.values, b.values)  # same surrogate, other draws


def test_unknown_estimator_is_a_clear_error(setup):
    _, _, run = setup
    s = pipeline.samples(run)
    f = method.fit(s, dataclasses.replace(RIDGE, ensemble=1), curve=False)
    with pytest.raises(WorkbenchError, match="unknown estimator 'magic'; choose from"):
        method.contributions(s, f, MethodSpec(estimator="magic"))


def test_too_few_masks_says_how_to_get_more(setup, tmp_path):
    root, spec, _ = setup
    small = RunSpec(spec.model, spec.data, SamplingSpec(scheme="size-uniform", n_masks=3, seed=5))
    pipeline.sample(small, cache_dir=tmp_path, progress=False)
    run = pipeline.open_run(small, tmp_path)
    with pytest.raises(EstimationError, match="engine sample"):
        pipeline.samples(run)


def test_decide_measures_every_k_and_chosen_set_is_best_measured(setup):
    _, _, run = setup
    s = pipeline.samples(run)
    f = method.fit(s, RIDGE, curve=False)
    c = method.contributions(s, f, MethodSpec(estimator="exact"))
    measure = pipeline._measure_fn(run)
    ds = method.decide(f, c, [1, 2, 3], measure, spec=MethodSpec(n_verify=3))
    assert [d.k for d in ds.items] == [1, 2, 3]
    for d in ds.items:
        assert len(d.removed) == d.k
        assert d.ppl_measured == min(x.ppl_measured for x in d.candidates)
    with pytest.raises(WorkbenchError, match="1..5"):
        method.decide(f, c, [L], measure, spec=MethodSpec(n_verify=1))
    paper_rule = method.decide(f, c, [2], measure, spec=MethodSpec(decision="rank-and-cut"))
    assert paper_rule.items[0].method == "rank-and-cut" and len(paper_rule.items[0].candidates) == 1


def test_run_command_end_to_end_json_and_export_reloads(setup, tmp_path, capsys):
    root, spec, _ = setup
    out = tmp_path / "pruned"
    argv = [
        "run", "--model", spec.model.name, "--data", spec.data.source, "--windows", "2", "--seq-len", "16",
        "--scheme", "size-uniform", "--masks", "48", "--cache-dir", str(root / "cache"), "--threads", "1",
        "--surrogate", "ridge-pairwise", "--ensemble", "2", "--estimator", "exact",
        "--remove", "2", "--out", str(out), "--json",
    ]
    code = cli.main(argv)
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["evaluated"] == 0  # the fixture's run already holds all 48 masks: resumed, not redone
    for key in ("r2", "spearman", "contributions", "estimator", "removed", "ppl_full", "ppl_predicted",
                "ppl_measured", "out"):
        assert key in result
    assert len(result["contributions"]) == L and len(result["removed"]) == 2
    stages = result["stage_seconds"]
    assert list(stages) == ["sample", "fit", "contributions", "decide", "export"]
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= result["seconds"] + 1e-3
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["removed_layers"] == result["removed"]
    assert result["verification"]["ppl_reloaded"] == pytest.approx(result["ppl_measured"], rel=1e-4)
    # Exporting again into the same, now non-empty, folder is refused without --overwrite.
    code = cli.main(argv)
    assert code != 0
    assert "--overwrite" in capsys.readouterr().err


def test_decisions_race_on_validation_then_calibration_windows_and_choose_the_best_finished(setup):
    import torch

    from engine.data import validation_windows
    from engine.decision import removal_mask
    from engine.evaluate import MaskEvaluator

    _, spec, run = setup
    cal = MaskEvaluator(run.lm, run.windows)
    base = MethodSpec(surrogate=RIDGE, estimator="exact", remove=2, n_verify=3, boot=0, val_windows=0)
    art = pipeline.decide(run, base)
    assert art["ks"] == [2]
    for d in art["decisions"]:
        assert d["tie_level"] == 0.9 and "calibration windows" in d["tied_on"]
        done = [c for c in d["candidates"] if c["outcome"] == "finished"]
        measured = {tuple(c["removed"]): c["ppl_measured"] for c in done}
        assert all(tuple(t) in measured and tuple(t) != tuple(d["removed"]) for t in d["tied"])
        assert d["ppl_measured"] == min(measured.values())  # the best finished set on the calibration windows
    val = MethodSpec(surrogate=RIDGE, estimator="exact", remove=2, n_verify=3, boot=0, val_windows=6)
    art = pipeline.decide(run, val)
    v = validation_windows(run.lm.tokenizer, spec.data, 6)
    pool = MaskEvaluator(run.lm, torch.cat([v.input_ids, run.windows.input_ids]))
    ev = MaskEvaluator(run.lm, v)
    for d in art["decisions"]:
        assert d["tied_on"].startswith("8 windows: 6 validation windows of the calibration text + the 2 calibration")
        sets = [tuple(c["removed"]) for c in d["candidates"] if c["outcome"] == "finished"]
        masks = np.stack([removal_mask(s, L) for s in sets])
        assert tuple(d["removed"]) == sets[int(np.argmin(pool.perplexities(masks)))]  # best over the pool
        chosen = removal_mask(d["removed"], L)[None]
        assert d["validation_ppl"] == pytest.approx(float(ev.perplexities(chosen)[0]), rel=1e-9)
        assert d["ppl_measured"] == pytest.approx(float(cal.perplexities(chosen)[0]), rel=1e-9)
    assert pipeline.artifact_name("decisions", val) != pipeline.artifact_name("decisions", base)
    # more validation windows than the text holds outside the calibration windows: all of the free ones
    free = validation_windows(run.lm.tokenizer, spec.data, 10**6, at_most=True).input_ids.shape[0]
    assert 6 < free < 10**6
    many = dataclasses.replace(val, val_windows=free + 50)
    assert all(d["tied_on"].startswith(f"{free + 2} windows: {free} validation windows")
               for d in pipeline.decide(run, many)["decisions"])
    assert MethodSpec().val_windows == 64  # the default races on validation windows (README: the rule and why)


@pytest.mark.parametrize("estimator", ["regression-adjusted", "exact"])
def test_window_boot_widens_the_intervals_by_the_window_noise_only(setup, estimator):
    _, _, run = setup
    s = pipeline.samples(run)
    assert s.window_nll.shape == (s.n, 2) and s.full_window_nll.shape == (2,)
    f = method.fit(s, RIDGE, curve=False)
    spec = MethodSpec(surrogate=RIDGE, estimator=estimator, boot=2)
    plain = method.contributions(s, f, spec).details["interval"]
    windowed = method.contributions(s, f, dataclasses.replace(spec, window_boot=30)).details["interval"]
    win = np.array(windowed["details"]["se"]["windows"])
    assert win.shape == (L,) and np.all(win >= 0) and np.any(win > 0)
    assert "windows" not in plain["details"]["se"]
    np.testing.assert_allclose(windowed["values"], plain["values"])
    # se = sqrt(se_without_windows^2 + se_windows^2): the window part is added as an independent source
    np.testing.assert_allclose(np.square(windowed["se"]), np.square(plain["se"]) + win**2, rtol=1e-9, atol=1e-15)


def test_window_boot_without_per_window_losses_says_what_to_do(setup):
    _, _, run = setup
    s = dataclasses.replace(pipeline.samples(run), window_nll=None, window_tokens=None)
    f = method.fit(s, RIDGE, curve=False)
    with pytest.raises(EstimationError, match="per calibration window"):
        method.contributions(s, f, MethodSpec(surrogate=RIDGE, estimator="regression-adjusted", window_boot=10))
    assert estimators.window_scores(s, 0, 0) is None  # window_boot 0: no window part


def test_each_estimator_owns_its_estimand_weighting_estimate_and_interval(setup):
    from engine import contribution_intervals as ci
    from engine.estimators import SAMPLED_STRATA_SEMIVALUE
    from engine.surrogate import SingleFit

    _, _, run = setup
    s = pipeline.samples(run)
    f = method.fit(s, RIDGE, curve=False)
    fit_one = SingleFit(dataclasses.replace(RIDGE, ensemble=1))
    key = {SHAPLEY_VALUE: "shapley", STRATA_SEMIVALUE: "strata", BANZHAF_VALUE: "banzhaf",
           SAMPLED_STRATA_SEMIVALUE: "sampled-strata"}
    for name, est in ESTIMATORS.items():
        spec = MethodSpec(surrogate=RIDGE, estimator=name, boot=2)
        x = est.input(s, f.members, fit_one, spec)
        assert x.weighting == est.weighting(s.design, L) and x.n_layers == L and x.n_boot == 2
        assert ci.estimand_of(x.weighting) == key[est.estimand_on(s.design, L)]
        c = est.run(x)
        iv = est.interval(x, c)
        if est.uses_real_evaluations:  # regression-adjusted: its estimate carries its own interval
            assert iv is None and c.details["interval"]["estimand"] == key[est.estimand_on(s.design, L)]
        else:
            assert iv.estimator == name and iv.estimand == key[est.estimand_on(s.design, L)]
            np.testing.assert_allclose(iv.values, c.values)
            assert est.interval(dataclasses.replace(x, n_boot=0), c) is None  # no bootstrap asked: no interval


def test_the_stored_estimand_follows_the_design_and_its_depth(setup):
    """Strata with no two adjacent kept counts: regression adjustment targets the paper's restricted-strata
    semivalue, and the contributions' record says so (it said 'sampled kept counts' without L)."""
    from engine.config import SamplingSpec

    _, _, run = setup
    s = pipeline.samples(run)
    lone = dataclasses.replace(s, design=SamplingSpec(strata=(L - 2, L - 4)))
    f = method.fit(lone, RIDGE, curve=False)
    c = method.contributions(lone, f, MethodSpec(surrogate=RIDGE, estimator="regression-adjusted", boot=0))
    assert c.details["estimand"] == STRATA_SEMIVALUE == estimators.get("regression-adjusted").estimand_on(lone.design, L)
