"""engine.session: the settings a new app session opens on, from the run store and the URL (no model)."""

import dataclasses
import time

from engine import session
from engine.config import DataSpec, MethodSpec, RunSpec, SamplingSpec, SurrogateSpec
from engine.store import RunStore


def _run(cache, run_id: str, spec: RunSpec, n_rows: int, n_layers: int = 4) -> RunStore:
    store = RunStore.open(cache, run_id, {"spec": dataclasses.asdict(spec), "model": "demo", "data": "demo",
                                          "n_layers": n_layers})
    with store.writer(target=spec.sampling.n_masks) as w:
        for i in range(n_rows):
            w.add(format(i + 1, f"0{n_layers}b"), 10.0 + i, 0.5, False, 0.01)
    return store


def test_no_runs_gives_nothing(tmp_path):
    assert session.restore(tmp_path, {}) is None


def test_latest_run_with_its_masks_and_its_latest_result_settings(tmp_path):
    old = RunSpec(sampling=SamplingSpec(n_masks=300, seed=1))
    _run(tmp_path, "aaaaaaaaaaaa", old, 3)
    time.sleep(0.01)
    spec = RunSpec(data=DataSpec(n_windows=4), sampling=SamplingSpec(n_masks=256, seed=2))
    store = _run(tmp_path, "bbbbbbbbbbbb", spec, 5)  # asked 256, holds 5 (cancelled): the inputs say 5
    fit_method = MethodSpec(surrogate=SurrogateSpec(ensemble=1))
    store.put_artifact("fit:x", {"stage": "fit", "spec": fit_method.key("fit")})
    time.sleep(0.01)
    chosen = MethodSpec(surrogate=SurrogateSpec(ensemble=1, kind="gbt"), estimator="exact", swaps=0)
    store.put_artifact("decisions:y", {"stage": "decisions", "spec": chosen.key("decisions"), "ks": [1, 2, 3]})
    got = session.restore(tmp_path, {})
    assert got.run_id == "bbbbbbbbbbbb" and got.origin == "latest" and not got.notes
    assert got.spec == dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, n_masks=5))
    assert got.method == dataclasses.replace(chosen, remove=3)  # the largest k the decision holds
    assert session.url_params(got.run_id, got.method) == {"run": "bbbbbbbbbbbb", "k": "3", "estimator": "exact",
                                                          "surrogate": "gbt"}


def test_a_summary_records_its_k(tmp_path):
    store = _run(tmp_path, "cccccccccccc", RunSpec(), 4)
    m = MethodSpec(remove=2, estimator="paper")
    store.put_artifact("summary:z", {"stage": "summary", "spec": m.key("summary")})
    assert session.restore(tmp_path, {}).method == m


def test_the_link_names_run_and_settings_and_bad_values_are_reported(tmp_path):
    _run(tmp_path, "aaaaaaaaaaaa", RunSpec(sampling=SamplingSpec(seed=7)), 3)
    time.sleep(0.01)
    _run(tmp_path, "bbbbbbbbbbbb", RunSpec(), 3)
    got = session.restore(tmp_path, {"run": "aaaaaaaaaaaa", "k": "2", "estimator": "exact", "surrogate": "gbt"})
    assert got.run_id == "aaaaaaaaaaaa" and got.origin == "link" and got.spec.sampling.seed == 7
    assert (got.method.remove, got.method.estimator, got.method.surrogate.kind) == (2, "exact", "gbt")
    bad = session.restore(tmp_path, {"run": "ffffffffffff", "k": "9", "estimator": "nope", "surrogate": "x"})
    assert bad.run_id == "bbbbbbbbbbbb" and bad.origin == "latest" and bad.method == MethodSpec()
    text = " ".join(bad.notes)
    assert "not in this cache" in text and "k='9'" in text and "'nope'" in text and "'x'" in text


def test_config_layer_count_reads_the_depth_without_loading(tmp_path):
    """The captions' strata counts before any model is loaded: the depth from config.json alone."""
    from engine import views
    from engine.config import ModelSpec

    assert views.config_layer_count(ModelSpec(name="demo")) == 16
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 5}')
    assert views.config_layer_count(ModelSpec(name=str(tmp_path / "gpt2"))) == 5
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert views.config_layer_count(ModelSpec(name=str(tmp_path / "bad"))) is None
    assert views.config_layer_count(ModelSpec(name="someone/some-model")) is None  # a hub id: unknown until loaded
