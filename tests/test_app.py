"""AppTest for every page of the workbench against a small demo run made once per session.

The run (24 masks, 4 windows x 64 tokens of the bundled demo model and text) is created inside
the test session in a temporary cache dir passed to the app through $LAYERPRUNE_CACHE.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine import views
from engine.config import DEMO_MODEL_DIR, DataSpec, ModelSpec, RunSpec, SamplingSpec

APP = str(Path(__file__).resolve().parents[1] / "app.py")
SPEC = RunSpec(data=DataSpec(n_windows=4, seq_len=64), sampling=SamplingSpec(n_masks=24, seed=3))  # model set below

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo model not built yet")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(cache_dir, run_id) of a 24-mask demo run; the app sees the cache via $LAYERPRUNE_CACHE."""
    from engine import pipeline

    global SPEC
    cache = tmp_path_factory.mktemp("cache")
    # A private copy of the demo model: the run id hashes the weights, so it must not change mid-session.
    model = tmp_path_factory.mktemp("model") / "demo-lm"
    shutil.copytree(DEMO_MODEL_DIR, model)
    SPEC = dataclasses.replace(SPEC, model=ModelSpec(name=str(model)))
    saved = {k: os.environ.get(k) for k in ("LAYERPRUNE_CACHE", "LAYERPRUNE_THREADS", "OMP_NUM_THREADS")}
    os.environ.update(LAYERPRUNE_CACHE=str(cache), LAYERPRUNE_THREADS="1", OMP_NUM_THREADS="1")
    pipeline.set_threads(1)
    result = pipeline.sample(SPEC, cache, progress=False)
    assert result.total == 24
    yield cache, result.run_id
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _app(page: str | None = None, spec: RunSpec | None = None, method=None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["spec"] = spec or SPEC
    if method is not None:
        at.session_state["method"] = method
    at.run()
    assert not at.exception
    if page:
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, at.exception
    return at


def _button(at, label: str):
    matches = [b for b in at.button if b.label == label]
    assert matches, f"no button {label!r}: {[b.label for b in at.button]}"
    return matches[0]


def _click_job(at, label: str, timeout: float = 300):
    """Click a button that starts a background CLI job, wait for every job of the cache to end, rerun."""
    import time

    from engine import jobs

    clicked = time.time()
    _button(at, label).click().run()
    assert not at.exception, at.exception
    cache = Path(os.environ["LAYERPRUNE_CACHE"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [jobs.state(rec.parent.parent, rec.stem) for rec in cache.glob(f"*/{jobs.JOBS_DIR}/*.json")]
        if not any(s.running for s in states):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"jobs still running after {timeout} s")
    failed = [s.message for s in states if s.status == "failed" and s.started >= clicked]
    at.run()
    assert not at.exception, at.exception
    return failed


def _metrics(at) -> dict:
    return {m.label: m.value for m in at.metric}


def _charts(at) -> int:
    return len(at.get("plotly_chart"))


def test_setup_loads_model_and_shows_facts(demo_run):
    at = _app()
    assert at.title[0].value == "Setup"
    _button(at, "Load model").click().run()
    assert not at.exception
    m = _metrics(at)
    assert m["family"] == "llama" and m["layers"] == "16"
    assert float(m["baseline perplexity"]) > 1
    assert at.session_state["spec"].data.n_windows == SPEC.data.n_windows  # widgets start from the session spec
    at.run()
    strata = next(c.value for c in at.caption if "strata:" in c.value)
    assert strata.endswith("strata: the paper's strata scaled to the depth, keeping 15, 13, 12, 10, 9 of 16 layers")


def test_setup_bad_strata_keep_the_page_whole(demo_run):
    at = _app()
    at.radio[2].set_value("kept-layer counts").run()  # strata mode
    at.text_input[-1].set_value("14,x").run()
    assert not at.exception
    assert at.error and "Kept-layer counts" in at.error[0].value and "until this is fixed" in at.error[0].value
    assert _button(at, "Load model")  # the rest of Setup is still there
    assert views.format_bytes(12) == "12 B" and views.format_bytes(1536) == "1.5 KiB"


def test_setup_keeps_the_session_spec(demo_run, tmp_path):
    """Visiting Setup must not reset a spec chosen elsewhere (a CLI run selected on Sampling)."""
    global SPEC
    saved = SPEC
    upload = views.save_upload(tmp_path, "cal.txt", b"some calibration text " * 50, max_bytes=2**20)
    SPEC = RunSpec(model=saved.model, data=DataSpec(source=str(upload), n_windows=3, seq_len=32, seed=2),
                   sampling=SamplingSpec(n_masks=9, strata=(15, 11), seed=4))
    try:
        at = _app()
        assert at.session_state["spec"] == SPEC
    finally:
        SPEC = saved


def test_setup_shows_workbench_errors_without_traceback(demo_run, tmp_path):
    at = _app()
    at.radio(key="model_kind").set_value("Local folder").run()
    at.text_input(key="model_name").set_value(str(tmp_path / "missing")).run()
    _button(at, "Load model").click().run()
    assert not at.exception
    assert at.error and "missing" in at.error[0].value


def test_setup_offers_the_real_model_preset(demo_run):
    at = _app()
    at.radio(key="model_kind").set_value("SmolLM2-135M (real, 30 layers)").run()
    assert not at.exception
    assert at.session_state["spec"].model.name == "smollm2"
    text = " ".join(c.value for c in at.caption)
    assert "Apache-2.0" in text and "Q4_1-rounded" in text and "make fetch-smollm2" in text  # not fetched here


def test_sampling_lists_and_watches_the_run(demo_run):
    cache, run_id = demo_run
    at = _app("sampling")
    assert run_id in list(at.dataframe[0].value["run"])
    m = _metrics(at)
    assert m["samples"] == "24" and m["status"] == "finished"
    assert _charts(at) == 2  # perplexity vs kept layers, cumulative work
    assert len(at.dataframe) == 5  # runs, counts per stratum, rounds, fidelity, latest samples
    from engine.store import RunStore

    summary = RunStore(cache, run_id).summary()  # the run's rounds and fidelity, whatever the sampling defaults
    assert m["rounds"] == str(len(summary.rounds)) and m["complete masks"] == f"{24 - summary.partial} / 24"
    assert m["active masks"] == f"{sum(r['active'] for r in summary.rounds.values())} / 24"


def test_sampling_start_never_launches_a_second_writer(demo_run):
    cache, run_id = demo_run
    from engine.store import RunStore

    store = RunStore(cache, run_id)
    with store.writer(target=24):
        at = _app("sampling")
        _button(at, "Start / resume").click().run()
        assert not at.exception
        assert not (store.dir / "jobs").exists()  # no second writer was launched
        assert _metrics(at)["status"] == "running"


@pytest.mark.timeout(900)  # fit jobs (learning and quality-vs-work curves), decide: minutes on a loaded 2-core machine
def test_surrogate_fit_metrics_and_charts(demo_run):
    at = _app("surrogate")
    at.number_input[0].set_value(2)  # ensemble members
    assert not _click_job(at, "Fit")
    m = _metrics(at)
    assert {"held-out R²", "Spearman", "MAE (score)", "mean relative error (PPL)", "largest perplexity error"} <= set(m)
    interval = next(c.value for c in at.caption if "interval [" in c.value and "n = " in c.value)
    low, high = map(float, interval.split("[")[1].split("]")[0].split(", "))
    assert low <= float(m["held-out R²"]) <= high  # the one R², with its interval
    assert float(m["largest perplexity error"].rstrip("x")) >= 1.0
    assert _charts(at) == 4  # predicted vs true, residuals by stratum, learning curve, quality vs work
    assert "Held-out quality vs work" in at.get("plotly_chart")[3].proto.spec  # stored by `engine fit`


def test_shapley_contributions_baselines_and_csv(demo_run):
    at = _app("shapley")
    at.selectbox[0].set_value("exact")
    _click_job(at, "Compute contributions")
    assert _metrics(at)["estimator"] == "exact Shapley"
    assert "90% interval for the Shapley value" in at.get("plotly_chart")[0].proto.spec  # intervals on the bars
    assert "efficiency gap" in _metrics(at)
    assert _charts(at) == 1
    ranks = at.dataframe[0].value
    assert sorted(ranks["rank"]) == list(range(1, 17))
    assert at.get("download_button")
    at.multiselect(key="baselines").set_value(["last"]).run()
    _click_job(at, "Run 1 baseline(s)")
    assert _charts(at) == 2
    assert "rank agreement with the contributions (Spearman, 16 layers)" in at.dataframe[1].value.columns
    assert '"contribution (exact Shapley)"' in at.get("plotly_chart")[1].proto.spec  # the legend names the estimator
    dominant = views.dominant_layer(ranks.sort_values("layer")["contribution"].to_numpy())
    boxes = {c.key: c for c in at.checkbox}
    assert ("hide_dominant" in boxes) == (dominant is not None)  # offered exactly when one layer dwarfs the rest
    if dominant is not None:
        boxes["hide_dominant"].check().run()
        assert f"layer {dominant} left out" in at.get("plotly_chart")[0].proto.spec
    assert views.dominant_layer([5.0, 1.0, -1.2]) == 0 and views.dominant_layer([5.0, 2.0]) is None
    at.selectbox[0].set_value("banzhaf").run()  # nothing stored for it: the page stops before the baselines box
    at.selectbox[0].set_value("exact").run()
    assert at.multiselect(key="baselines").value == ["last"]  # the choice survived, matching the chart
    fresh = _app("shapley")  # a new session (a reload): the run's stored baselines are shown without a click
    fresh.selectbox[0].set_value("exact").run()
    assert "last" in fresh.multiselect(key="baselines").value and _charts(fresh) == 2


@pytest.mark.timeout(900)  # fit jobs (learning and quality-vs-work curves), decide: minutes on a loaded 2-core machine
def test_prune_decide_whatif_measure_export(demo_run, tmp_path):
    at = _app("surrogate")
    at.number_input[0].set_value(1)  # one surrogate: Prune reuses the session's fit (keeps the test short)
    assert not _click_job(at, "Fit")
    at.switch_page("pages/prune.py").run()
    at.number_input[0].set_value(2)
    assert not _click_job(at, "Decide")
    m = _metrics(at)
    assert float(m["measured, 2 removed"]) > 0 and "predicted perplexity" in m
    assert any("Statistically tied with it" in md.value for md in at.markdown)
    race = next(df.value for df in at.dataframe if "PPL, raced windows" in df.value.columns)
    chosen = race[race["chosen"] == "yes"]  # the chosen set is in the race table, best among the finishers
    finishers = race[race["windows seen"] == race["windows seen"].max()]
    assert len(chosen) == 1 and chosen["PPL, raced windows"].iloc[0] == finishers["PPL, raced windows"].min()
    assert _charts(at) == 1
    _button(at, "Measure").click().run()
    assert not at.exception
    assert float(_metrics(at)["measured perplexity"]) == pytest.approx(float(m["measured, 2 removed"]), rel=1e-6)
    out = tmp_path / "export"
    chosen = "-".join(map(str, sorted(at.session_state["whatif:2:24"])))
    assert at.text_input(key=f"export_out:{at.session_state['run_id']}:{chosen}").value.endswith(chosen)
    at.text_input(key=f"export_out:{at.session_state['run_id']}:{chosen}").set_value(str(out))
    assert not _click_job(at, "Export pruned model")
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert len(manifest["removed_layers"]) == 2
    at.run()
    assert at.success and "passed" in at.success[0].value
    assert manifest["removed_layers"] == sorted(at.session_state["whatif:2:24"])  # exactly the set on screen
    failed = _click_job(at, "Export pruned model")  # non-empty folder without overwrite: refused
    assert at.error and "not empty" in at.error[0].value, failed
    # A reload (a new session, nothing set by hand) opens on this run and shows the stored decision.
    fresh = _fresh_session()
    assert fresh.session_state["run_id"] == at.session_state["run_id"]
    assert fresh.query_params["run"] == at.session_state["run_id"] and fresh.query_params["k"] == "2"
    fresh.switch_page("pages/prune.py").run()
    assert not fresh.exception
    assert float(_metrics(fresh)["measured, 2 removed"]) == pytest.approx(float(m["measured, 2 removed"]), rel=1e-9)
    # the what-if editor labels a prediction outside the run's sampled kept counts (strata 9-15 of 16)
    assert not any("outside the sampled region" in w.value for w in at.warning)
    at.session_state["whatif:2:24"] = list(range(12))  # keeps 4 layers
    at.run()
    assert any("outside the sampled region (kept 9-15)" in w.value for w in at.warning)


def _fresh_session(query: dict | None = None):
    """The app as a reload or a new tab sees it: no session state, optionally a link's query parameters."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=60)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def test_a_new_session_opens_on_a_stored_run_and_reports_a_bad_link(demo_run):
    cache, run_id = demo_run
    at = _fresh_session({"run": run_id})
    assert at.session_state["run_id"] == run_id and at.query_params["run"] == run_id
    assert at.session_state["spec"].sampling.n_masks == views_count(cache, run_id)
    bad = _fresh_session({"run": run_id, "k": "99"})
    assert bad.warning and "k='99'" in bad.warning[0].value and bad.session_state["run_id"] == run_id


def views_count(cache, run_id: str) -> int:
    from engine.store import RunStore

    return RunStore(cache, run_id).count()


def test_sample_command_reproduces_the_spec(tmp_path):
    from engine.cli import build_parser, run_spec

    spec = RunSpec(sampling=SamplingSpec(n_masks=7, strata=(14, 12), seed=5), data=DataSpec(n_windows=3))
    argv = views.sample_command(spec, tmp_path, threads=1)
    assert views.job_target(argv) == 7 and views.job_target(["sample"]) is None  # shown while the model loads
    args = build_parser().parse_args(argv[3:])
    assert run_spec(args) == spec and args.cache_dir == str(tmp_path)
    assert views.spec_from_dict(json.loads(json.dumps(dataclasses.asdict(spec)))) == spec


def test_save_upload_stays_in_cache_and_checks_size(tmp_path):
    from engine.errors import DataError

    path = views.save_upload(tmp_path, "../../evil.txt", b"hello world", max_bytes=100)
    assert path.parent == (tmp_path / "uploads").resolve() and path.read_bytes() == b"hello world"
    with pytest.raises(DataError, match="limit"):
        views.save_upload(tmp_path, "a.txt", b"x" * 101, max_bytes=100)
    with pytest.raises(DataError, match=".txt or .jsonl"):
        views.save_upload(tmp_path, "a.exe", b"x", max_bytes=100)



def test_comparison_page_only_with_bench_results(demo_run, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_BENCH_RESULTS", str(tmp_path))
    at = _app()
    with pytest.raises(ValueError, match="Could not find a navigation page"):
        at.switch_page("pages/comparison.py")  # not in the navigation without results: no placeholder page
    rows = ["method,k,ppl_calibration,ppl_demo-test"]
    for m, base in (("shapley:paper", 50.0), ("last", 70.0), ("optimum", 45.0)):
        rows += [f"{m},{k},{base + 3 * k},{base + 5 * k}" for k in (2, 4)]
    (tmp_path / "compare.csv").write_text("\n".join(rows) + "\n")
    fid = ["n,seed,estimator,target,spearman,rel_l2"]
    fid += [f"{n},{s},paper,strata,{0.5 + n / 1000},{1 - n / 1000}" for n in (64, 256) for s in (0, 1)]
    (tmp_path / "fidelity.csv").write_text("\n".join(fid) + "\n")
    at = _app("comparison")
    assert at.title[0].value == "Comparison"
    assert _charts(at) == 2  # benchmark curves and fidelity curve
    assert list(at.dataframe[0].value["method"]) == ["last", "optimum", "shapley:paper"]


@pytest.mark.timeout(900)  # fit jobs (learning and quality-vs-work curves), decide: minutes on a loaded 2-core machine
def test_summary_page_builds_the_report_and_generates(demo_run):
    at = _app("surrogate")
    at.number_input[0].set_value(1)
    assert not _click_job(at, "Fit")
    at.switch_page("pages/prune.py").run()
    at.number_input[0].set_value(2)
    assert not _click_job(at, "Decide")
    at.switch_page("pages/summary.py").run()
    assert not at.exception
    assert not _click_job(at, "Build summary")
    m = _metrics(at)
    assert m["layers removed"] == "2 of 16"
    assert _charts(at) == 3  # layer strip, contributions (red: removed), perplexity vs layers removed
    assert "Removing 2 of 16 layers" in at.markdown[0].value or any("Removing 2 of 16 layers" in md.value for md in at.markdown)
    assert at.get("download_button")
    at.text_input(key="summary_prompt").set_value("The list").run()
    _button(at, "Generate").click().run()
    assert not at.exception
    # healing: nothing stored yet, then the Heal job (a tiny budget set on the page) and its table
    assert any("No healing stored" in c.value for c in at.caption) and _button(at, "Heal")
    from engine import pipeline
    from engine.store import RunStore

    at.number_input(key="heal_steps").set_value(2)
    at.number_input(key="heal_generated").set_value(4)
    assert not _click_job(at, "Heal")
    store = RunStore(demo_run[0], demo_run[1])
    record = store.get_artifact(next(n for n in store.artifact_names() if n.startswith("summary:")))
    healed = store.get_artifact(pipeline.heal_name(record["removed"], 16))
    assert healed["steps"] == 2 and healed["settings"]["generated"] == 4 and healed["verified"] is True
    table = at.dataframe[-1].value
    assert list(table.columns)[:4] == ["text", "full model", "pruned", "healed"] and len(table) == 3  # held back + 2
    assert table["healed"].iloc[0] == f"{healed['ppl_after']:,.2f}"
    assert any("2 LoRA steps" in c.value and "4 windows sampled" in c.value for c in at.caption)
    # the HTML report (what the download button offers) carries the same before/after table
    from engine import html_report

    assert "After healing" not in html_report.to_html(record)
    report = html_report.to_html(record, healed)
    assert "After healing (LoRA)" in report and f"{healed['ppl_after']:,.2f}" in report


def _plotly_array(x):
    """A plotly figure-JSON array: a list, or a typed array {dtype, bdata (base64), shape}."""
    import base64

    if isinstance(x, dict) and "bdata" in x:
        a = np.frombuffer(base64.b64decode(x["bdata"]), dtype=x["dtype"])
        return a.reshape([int(n) for n in str(x.get("shape", len(a))).split(",")])
    return np.array(x, dtype=float)


def test_interactions_heatmap_profile_pairs_measure_and_near_sets(demo_run):
    from engine import pipeline
    from engine.config import MethodSpec

    run = pipeline.open_run(SPEC, demo_run[0], create=False)
    pipeline.contributions(run, MethodSpec(estimator="exact"))  # shown in the estimator overlay
    at = _app("interactions")
    assert any("No interaction map" in i.value for i in at.info)
    at.checkbox(key="interaction_bias_check").check().run()
    assert not _click_job(at, "Compute interactions")
    heat = json.loads(at.get("plotly_chart")[0].proto.spec)
    trace = heat["data"][0]
    z, stderr = _plotly_array(trace["z"]), _plotly_array(trace["customdata"])
    assert trace["type"] == "heatmap" and trace["zmid"] == 0 and z.shape == (16, 16) == stderr.shape
    scale = trace["colorscale"]  # diverging, red at the positive (synergy) end
    assert scale[0][1] == "rgb(5,48,97)" and scale[-1][1] == "rgb(103,0,31)"  # RdBu reversed: blue -> red
    assert np.isnan(z[3, 3]) and np.allclose(z[0, 1:], z[1:, 0])  # diagonal left out; symmetric
    assert "%{customdata" in trace["hovertemplate"] and (stderr >= 0).all()
    assert _charts(at) == 3  # heatmap, profile, contributions by estimator
    overlay = json.loads(at.get("plotly_chart")[2].proto.spec)["data"]
    names = {t["name"] for t in overlay}
    assert "sii diagonal" in names and "exact Shapley" in names
    assert {"strongest pair", "pairs outside the bias check"} <= set(_metrics(at))
    syn, red = at.dataframe[0].value, at.dataframe[1].value
    assert (syn["value"] > 0).all() and (red["value"] < 0).all()
    distinct = syn["distinct from 0 (90%)"] == "yes"  # marked exactly where the 90% normal interval excludes 0
    assert (distinct == (syn["value"].abs() > 1.6448536 * syn["stderr"])).all()
    bound, clipped = views.colour_bound(z[~np.isnan(z)])
    assert trace["zmax"] == pytest.approx(bound) and (clipped == any("clip the colour" in c.label for c in at.checkbox))
    at.selectbox(key="interaction_layer").set_value(5).run()
    prof = json.loads(at.get("plotly_chart")[1].proto.spec)["data"][0]
    assert json.loads(at.get("plotly_chart")[1].proto.spec)["data"][1]["name"].startswith("bias check")
    partners = _plotly_array(prof["x"])
    assert 5 not in partners and len(partners) == 15
    at.selectbox(key="measure_a").set_value(1).run()
    at.selectbox(key="measure_b").set_value(2).run()
    _button(at, "Measure").click().run()
    assert not at.exception, at.exception
    frames = [d.value for d in at.dataframe]
    measured = next(f for f in frames if "PPL without both" in f.columns)
    assert list(measured[["layer a", "layer b"]].iloc[-1]) == [1, 2] and measured["PPL without both"].iloc[-1] > 0
    assert np.isfinite(measured["surrogate's interaction at the full model"].iloc[-1])
    at.number_input(key="near_k").set_value(2).run()
    at.number_input(key="near_top").set_value(4).run()
    assert not _click_job(at, "Find near-optimal sets")
    sets = next(d.value for d in at.dataframe if "predicted PPL" in d.value.columns)
    assert len(sets) == 4 and all(len(r.split(", ")) == 2 for r in sets["removed"])
    assert _charts(at) == 4  # + layer frequency
    assert not any("outside the sampled region" in w.value for w in at.warning)  # kept 14: inside 9-15
    at.number_input(key="near_k").set_value(8).run()  # kept 8: below every sampled count
    assert not _click_job(at, "Find near-optimal sets")
    at.select_slider(key="near_show_k").set_value(8).run()
    assert any("keeps 8 of 16 layers: outside the sampled region (kept 9-15)" in w.value for w in at.warning)


# ---------------------------------------------------------------- multi-fidelity and active runs

ADAPTIVE = SamplingSpec(n_masks=24, seed=3, first_windows=2, complete=0.5, rounds=2, explore=0.5)


@pytest.fixture(scope="session")
def adaptive_run(demo_run, tmp_path_factory):
    """(cache, run_id, spec, method) of a 24-mask demo run in two rounds (the second half active), each mask
    first evaluated on 2 of the 4 windows and half of them completed, fitted with its quality-vs-work
    curve (what `engine fit` stores), in a cache of its own."""
    from engine import pipeline
    from engine.config import MethodSpec, SurrogateSpec

    cache = tmp_path_factory.mktemp("adaptive")
    spec = dataclasses.replace(SPEC, sampling=ADAPTIVE)
    run = pipeline.open_run(spec, cache)
    result = pipeline.sample(spec, cache, progress=False, run=run)
    assert result.total == 24 and 0 < result.partial < 24 and len(result.rounds) == 2
    method = MethodSpec(surrogate=SurrogateSpec(kind="ridge-pairwise", ensemble=1))
    pipeline.fit(run, method)
    pipeline.work_curve(run, method)
    return cache, run.run_id, spec, method


def _frame(at, column: str):
    frames = [d.value for d in at.dataframe if column in d.value.columns]
    assert frames, f"no table with a {column!r} column"
    return frames[0]


@pytest.mark.timeout(900)  # sets up the adaptive run: a committee fit (5 MLPs), minutes on a loaded 2-core machine
def test_sampling_shows_rounds_fidelity_and_work(adaptive_run, monkeypatch):
    from engine.store import RunStore

    cache, run_id, spec, _ = adaptive_run
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(cache))
    at = _app("sampling", spec)
    store = RunStore(cache, run_id)
    summary, t = store.summary(), store.table()
    m = _metrics(at)
    assert m["samples"] == "24" and m["rounds"] == "2"
    active = sum(r["active"] for r in summary.rounds.values())
    assert 0 < active < 24 and m["active masks"] == f"{active} / 24"
    assert m["complete masks"] == f"{24 - summary.partial} / 24"
    assert m["work (token-layer calls)"] == views.format_count(summary.work)
    rounds = _frame(at, "active")
    assert rounds["round"].tolist() == sorted(summary.rounds)
    assert rounds["masks"].tolist() == [summary.rounds[r]["masks"] for r in sorted(summary.rounds)]
    assert rounds["active"].tolist() == [summary.rounds[r]["active"] for r in sorted(summary.rounds)]
    assert (rounds["design"] + rounds["active"] == rounds["masks"]).all()
    assert rounds["partial"].sum() == summary.partial and rounds["work (token-layer calls)"].sum() == summary.work
    fidelity = _frame(at, "windows evaluated")
    expect = {f"{k} of 4": int((t.windows == k).sum()) for k in np.unique(t.windows)}
    assert dict(zip(fidelity["windows evaluated"], fidelity["masks"])) == expect and set(expect) == {"2 of 4", "4 of 4"}
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    scatter = charts[0]["data"]
    assert {tr["name"].split(",")[0] for tr in scatter} == {"round 0", "round 1"}  # coloured by round
    assert {tr["marker"]["symbol"] for tr in scatter} == {"circle", "circle-open"}  # complete / partial
    work = charts[1]["data"]
    y = np.concatenate([_plotly_array(tr["y"]) for tr in work])
    assert y.max() == summary.work and len(y) == 24  # cumulative work reaches the store's
    assert any("2 of 4 windows first" in c.value and "2 rounds" in c.value for c in at.caption)
    # rows the live view read before they were completed are read again (completions add windows, not rows)
    done = [r for r in store.results() if r.windows == 4][-1]  # among the 20 latest rows shown
    stale = [dataclasses.replace(r, windows=2, ppl=-1.0) if r.rowid == done.rowid else r for r in store.results()]
    at.session_state[f"rows:{run_id}"] = stale
    at.run()
    latest = _frame(at, "seconds")
    assert (latest["perplexity"] > 0).all() and sorted(latest["windows"]) == sorted(t.windows[-len(latest):])


@pytest.mark.timeout(900)  # may set up the adaptive run: a committee fit (5 MLPs), minutes on a loaded 2-core machine
def test_sampling_start_launches_the_adaptive_run_on_screen(adaptive_run, monkeypatch):
    """The four inputs set on screen become the sampling job's flags (generated from the spec): the CLI
    parses them back to exactly that spec, so the job samples the run on screen (same run id)."""
    from engine import jobs
    from engine.cli import build_parser, run_spec

    cache, run_id, spec, _ = adaptive_run
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(cache))
    launched = []
    monkeypatch.setattr(jobs, "launch", lambda run_dir, name, argv: launched.append((Path(run_dir).name, argv)))
    at = _app("sampling", dataclasses.replace(spec, sampling=SamplingSpec(n_masks=24, seed=3)))
    for label, value in (("first windows", 2), ("share completed", 0.5), ("rounds", 2),
                         ("share drawn from the design", 0.5)):
        next(w for w in at.number_input if w.label == label).set_value(value).run()
        assert not at.exception, at.exception
    assert at.session_state["spec"].sampling == ADAPTIVE
    assert any("2 of 4 windows first, 50% completed · 2 rounds, 50% from the design" in c.value for c in at.caption)
    _button(at, "Start / resume").click().run()
    assert not at.exception, at.exception
    (folder, argv), = launched
    assert folder == run_id  # the run store of these settings
    words = " ".join(argv)
    assert "--first-windows 2" in words and "--complete 0.5" in words and "--rounds 2" in words
    assert "--explore 0.5" in words
    assert run_spec(build_parser().parse_args(argv[3:])) == spec


@pytest.mark.timeout(900)  # may set up the adaptive run: a committee fit (5 MLPs), minutes on a loaded 2-core machine
def test_surrogate_shows_the_quality_vs_work_curve(adaptive_run, monkeypatch):
    from engine import pipeline
    from engine.store import RunStore

    cache, run_id, spec, method = adaptive_run
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(cache))
    at = _app("surrogate", spec, method)
    store = RunStore(cache, run_id)
    fit = pipeline.stored(store, "fit", method)
    curve = fit["work_curve"]
    assert not fit["stale"] and curve["points"]
    frame = _frame(at, "work on fitted masks")
    work = frame["work (token-layer calls)"]
    assert work.tolist() == [p["work"] for p in curve["points"]]
    assert work.is_monotonic_increasing and work.iloc[-1] <= store.summary().work
    assert frame["held-out n"].tolist() == [fit["report"]["split"]["n_test"]] * len(frame)
    assert frame["Spearman [90%]"].tolist() == [f"{p['spearman']:.3f} [{p['spearman_low']:.3f}, "
                                                f"{p['spearman_high']:.3f}]" for p in curve["points"]]
    chart = next(json.loads(c.proto.spec) for c in at.get("plotly_chart")
                 if "Held-out quality vs work" in c.proto.spec)
    names = [tr["name"] for tr in chart["data"]]
    assert names == ["held-out R²", "held-out Spearman"]
    assert _plotly_array(chart["data"][1]["x"]).tolist() == work.tolist()
    assert "error_y" in chart["data"][1]  # intervals on every point
    assert any("evaluated on every window" in c.value for c in at.caption)  # partial masks are said


def test_fidelity_and_round_tables_follow_the_progress_record():
    progress = {"rounds": {0: {"masks": 3, "active": 0, "complete": 2, "work": 30},
                           1: {"masks": 2, "active": 1, "complete": 1, "work": 10}},
                "rows": {"rowid": [1, 2, 3, 4, 5], "round": [0, 0, 0, 1, 1], "windows": [4, 2, None, 4, 2],
                         "complete": [True, False, True, True, False], "cumulative_work": [10, 20, 30, 35, 40]},
                "n_windows": 4, "n_masks": 5, "complete": 3, "partial": 2, "work": 40}
    rt = views.round_table(progress)
    assert rt["design"].tolist() == [3, 1] and rt["partial"].tolist() == [1, 1]
    assert rt["share of work"].tolist() == [0.75, 0.25]
    ft = views.fidelity_table(progress)
    assert dict(zip(ft["windows evaluated"], ft["masks"])) == {"4 of 4": 2, "2 of 4": 2,
                                                               "all (no per-window losses stored)": 1}
    wf = views.work_frame(progress)
    assert wf["cumulative work"].tolist() == [10, 20, 30, 35, 40] and wf["fidelity"].tolist()[1] == "partial"
    assert views.fidelity_labels([4, 2, None, float("nan")], 4) == ["complete", "partial", "complete", "complete"]
