"""What the app shows when it opens: the settings of a stored run, from the store and the URL.

A Streamlit session starts empty on every reload and in every new tab. So that a reload, a second
tab or a shared link shows the same run and results, the app keeps the settings that identify
them in the URL (`URL_KEYS`) and rebuilds the rest from the run's store:

- the run: the URL's ``run`` when the cache holds it, else the most recently updated readable run;
- its RunSpec: the one stored in the run's meta, with ``n_masks`` = the run's target while it is
  sampling, else the masks it holds (so the inputs say what the run has);
- the stage-2 settings (MethodSpec): those of the run's most recent stored result (summary,
  decisions, contributions or fit; each artifact records the spec fields that decided it), with
  ``k`` from that result (a summary's k, or the largest k a decision holds);
- then the URL's ``k``, ``estimator`` and ``surrogate`` override them; a value the registries do
  not know is ignored and reported in `notes`.

No streamlit here (pages/_ui.py calls it and writes `url_params` back to the URL).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from engine.config import MethodSpec, RunSpec, SurrogateSpec
from engine.store import RunStore, list_runs

URL_KEYS = ("run", "k", "estimator", "surrogate")
RESULT_PREFIXES = ("summary:", "decisions:", "contributions:", "fit:")


@dataclass(frozen=True)
class Restored:
    run_id: str
    spec: RunSpec
    method: MethodSpec
    origin: str  # "link" (the URL named the run) | "latest" (the most recently updated run)
    notes: tuple[str, ...] = ()  # URL values that were ignored, in words


def method_from_key(key: Mapping) -> MethodSpec:
    """A MethodSpec from an artifact's recorded ``spec`` (MethodSpec.key(...)): fields it lacks keep defaults."""
    names = {f.name for f in dataclasses.fields(MethodSpec)} - {"surrogate"}
    surrogate = SurrogateSpec(**{k: v for k, v in dict(key.get("surrogate") or {}).items()
                                 if k in {f.name for f in dataclasses.fields(SurrogateSpec)}})
    return MethodSpec(surrogate=surrogate, **{k: v for k, v in key.items() if k in names})


def _stored_method(store: RunStore) -> MethodSpec:
    latest = store.latest_artifact(RESULT_PREFIXES)
    if latest is None:
        return MethodSpec()
    name, art = latest
    method = method_from_key(art.get("spec") or {})
    if method.remove is None and name.startswith("decisions:") and art.get("ks"):
        method = dataclasses.replace(method, remove=int(max(art["ks"])))
    return method


def _from_url(method: MethodSpec, params: Mapping[str, str], n_layers: int | None) -> tuple[MethodSpec, list[str]]:
    from engine.estimators import ESTIMATORS
    from engine.surrogate import SURROGATES

    notes, changes = [], {}
    if params.get("k"):
        k = str(params["k"])
        if k.isdigit() and 1 <= int(k) < (n_layers or 10**9):
            changes["remove"] = int(k)
        else:
            notes.append(f"the link's k={k!r} is not a layer count between 1 and {(n_layers or 2) - 1}; ignored")
    if params.get("estimator"):
        if params["estimator"] in ESTIMATORS:
            changes["estimator"] = params["estimator"]
        else:
            notes.append(f"the link's estimator {params['estimator']!r} is unknown; ignored")
    if params.get("surrogate"):
        if params["surrogate"] in SURROGATES:
            changes["surrogate"] = dataclasses.replace(method.surrogate, kind=params["surrogate"])
        else:
            notes.append(f"the link's surrogate {params['surrogate']!r} is unknown; ignored")
    return dataclasses.replace(method, **changes), notes


def restore(cache_dir, params: Mapping[str, str]) -> Restored | None:
    """The settings to open the app on (module docstring), or None when the cache holds no readable run."""
    from engine.views import spec_from_dict

    runs = [r for r in list_runs(cache_dir) if r.problem is None]
    wanted = params.get("run")
    chosen = next((r for r in runs if r.run_id == wanted), None) if wanted else None
    notes = [] if chosen or not wanted else [f"the link's run {wanted!r} is not in this cache; showing the latest run"]
    chosen = chosen or (runs[0] if runs else None)
    if chosen is None:
        return None
    store = RunStore(cache_dir, chosen.run_id)
    meta = store.meta()
    spec = spec_from_dict(meta["spec"])
    n_masks = chosen.target if chosen.status == "running" and chosen.target else chosen.n_samples or chosen.target
    if n_masks:
        spec = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, n_masks=int(n_masks)))
    method, url_notes = _from_url(_stored_method(store), params, chosen.n_layers)
    return Restored(chosen.run_id, spec, method, "link" if wanted and not notes else "latest",
                    tuple(notes + url_notes))


def url_params(run_id: str, method: MethodSpec) -> dict[str, str]:
    """The URL query parameters that identify what the pages show (`URL_KEYS`)."""
    out = {"run": run_id, "estimator": method.estimator, "surrogate": method.surrogate.kind}
    if method.remove is not None:
        out["k"] = str(method.remove)
    return out
