"""One builder per JSON record the stages return or store (fit, contributions, the run record's
contribution fields), so each field is written in one place."""

from __future__ import annotations

import numpy as np

from engine.pipeline.run import OpenRun


def _fit_json(run: OpenRun, f) -> dict:
    """The fit artifact: headline, report, curve/comparison, and the held-out predictions (store
    order row indices and predicted scores), so pages plot predicted vs true without refitting."""
    test = f.fitted.report.split.test
    heldout = {"rows": [int(i) for i in test], "predicted": [float(x) for x in f.predict(f.samples.masks[test])]}
    return {"run_id": run.run_id, **f.headline, **f.summary, "heldout": heldout}


def _contributions_json(run: OpenRun, f, c, estimator: str) -> dict:
    out = c.to_dict()
    return {
        "run_id": run.run_id,
        "key": estimator,  # the registry name (`estimator` is the descriptive one)
        "estimator": c.estimator,
        "estimand": out["details"].get("estimand"),
        "budget": out["details"].get("budget"),
        "contributions": out["values"],
        "stderr": out["stderr"],
        **_interval_fields(out["details"].get("interval")),
        "ranking": [int(i) for i in np.argsort(c.values, kind="stable")],  # least important first
        "n_evaluations": c.n_evaluations,
        "efficiency": out["details"].get("efficiency"),
        "r2": f.headline.get("r2"),
        "details": out["details"],
    }


def _interval_fields(interval: dict | None) -> dict:
    """ci_low / ci_high / level (None when no interval was computed) and what the interval is for."""
    if not interval:
        return {"ci_low": None, "ci_high": None, "level": None}
    return {"ci_low": interval["ci_low"], "ci_high": interval["ci_high"], "level": interval["level"],
            "interval_estimand": interval["estimand_text"], "bias_allowance": interval["bias_allowance"]}
