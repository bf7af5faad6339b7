"""AppTest of the Downstream page: the offline hint without task data, then a background `engine
evaluate` job whose stored results (decision vs full model, paired interval) the page shows."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest

from engine.config import DEMO_MODEL_DIR, DataSpec, ModelSpec, RunSpec, SamplingSpec, ZeroShotSpec
from test_app import _app, _button, _click_job
from test_zeroshot import write_task_files

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo model not built yet")

SPEC = RunSpec(data=DataSpec(n_windows=4, seq_len=64), sampling=SamplingSpec(n_masks=24, seed=3))


@pytest.fixture()
def demo_cache(tmp_path):
    from engine import pipeline

    model = tmp_path / "demo-lm"
    shutil.copytree(DEMO_MODEL_DIR, model)
    spec = dataclasses.replace(SPEC, model=ModelSpec(name=str(model)))
    saved = {k: os.environ.get(k) for k in ("LAYERPRUNE_CACHE", "LAYERPRUNE_THREADS", "OMP_NUM_THREADS")}
    os.environ.update(LAYERPRUNE_CACHE=str(tmp_path / "cache"), LAYERPRUNE_THREADS="1", OMP_NUM_THREADS="1")
    pipeline.set_threads(1)
    assert pipeline.sample(spec, tmp_path / "cache", progress=False).total == 24
    yield tmp_path / "cache", spec
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_downstream_page_evaluates_in_the_background(demo_cache):
    cache, spec = demo_cache
    at = _app("downstream", spec=spec)
    assert any("make fetch-tasks" in w.value for w in at.warning)  # no task data yet: how to get it
    write_task_files(cache)
    at.run()
    assert not at.warning and not at.exception
    at.number_input(key="ds_k").set_value(2)
    at.number_input(key="ds_limit").set_value(2)
    at.multiselect(key="ds_tasks").set_value(["piqa", "arc_easy"]).run()
    assert any("press Evaluate" in i.value for i in at.info)
    assert not _click_job(at, "Evaluate")  # decides k = 2 first (no stored decision), then evaluates both
    table = at.dataframe[0].value
    assert table["model"].tolist() == ["decision", "full"]
    assert table["removed"].tolist()[1] == "none" and "(n=2)" in table["piqa"].tolist()[0]
    assert table["decision − this"].tolist()[1].startswith(("+", "-"))
    from engine import pipeline

    run = pipeline.open_run(spec, cache, create=False)
    t = pipeline.zeroshot_table(run, dataclasses.replace(pipeline.MethodSpec(), remove=2),
                                ZeroShotSpec(tasks=("piqa", "arc_easy"), limit=2), ("decision", "full"), cache)
    assert [r["stored"] for r in t["rows"]] == [True, True] and len(t["rows"][0]["removed"]) == 2
    _button(at, "Evaluate")  # still offered (a rerun reuses the stored results)
