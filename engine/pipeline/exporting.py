"""Export and the commands built of stages: export (folder or GGUF), prune (fit -> contributions ->
decide -> export), run_all (sample -> prune), baseline, summarize (the stakeholder summary), generate."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from engine import atomic, validate
from engine.config import EvalSpec, MethodSpec, RunSpec
from engine.errors import EstimationError, InputError, WorkbenchError
from engine.store import RunStore
from engine.pipeline.run import OpenRun, _load, open_run
from engine.pipeline.artifacts import _put, heal_name, stored
from engine.pipeline.progress import StepProgress
from engine.pipeline.collect import sample
from engine.pipeline.results import manifest_contributions, prune_record
from engine.pipeline.stages import _contributions, _decide, _fit, _measure_fn, default_remove, measure
from engine.pipeline.downstream import stored_zeroshot_pair


def export(spec: RunSpec, method: MethodSpec, out_dir, removed=None, overwrite: bool = False, cache_dir=None,
           run: OpenRun | None = None, evaluation: EvalSpec = EvalSpec(), fmt: str = "folder",
           quant: str = "f32") -> dict:
    """Export the model without `removed` (default: the decision for k = method.remove) to `out_dir`,
    with manifest and model card, verified by a reload in a fresh process. `fmt="gguf"`: one GGUF
    file `out_dir` (engine.gguf_export) with `quant` f32 | f16 | q8_0 | q4_1."""
    from engine.export import check_export_folder

    if fmt == "gguf":
        from engine.gguf_export import check_gguf_out

        check_gguf_out(out_dir, overwrite)  # before any model is loaded
    elif fmt == "folder":
        check_export_folder(out_dir, overwrite)  # before any model is loaded
    else:
        raise InputError(f"unknown export format {fmt!r}; choose folder or gguf.")
    if run is None:
        facts = validate.check_run(spec, remove=len(set(removed)) if removed is not None else method.remove,
                                   cache_dir=cache_dir)
        validate.check_removed(removed, facts.n_layers if facts else None)  # ids before any load or measurement
        run = open_run(spec, cache_dir, evaluation, create=False, checked=True)  # analysis: never creates a run
    return export_run(run, method, out_dir, removed, overwrite, fmt, quant)


def export_run(run: OpenRun, method: MethodSpec, out_dir, removed=None, overwrite: bool = False, fmt: str = "folder",
               quant: str = "f32") -> dict:
    """`export` on an opened run (the output path already checked by the caller)."""
    validate.check_removed(removed, run.n_layers)
    if removed is not None:
        return _export(run, method, out_dir, overwrite, None, len(set(removed)), removed, fmt=fmt, quant=quant)
    k = default_remove(method, run.n_layers)
    _, _, ds, _ = _decide(run, method, (k,))
    return _export(run, method, out_dir, overwrite, ds, k, fmt=fmt, quant=quant)


def _export(run: OpenRun, method: MethodSpec, out_dir, overwrite: bool, ds, k: int, removed=None,
            fmt: str = "folder", quant: str = "f32") -> dict:
    from engine.decision import removal_mask
    from engine.export import prune_model

    art = stored(run, "fit", method) or {}
    if removed is None:
        d = ds.for_k(k)
        removed, measured, predicted, rule = d.removed, d.ppl_measured, d.ppl_predicted, d.method
        heldout = {name: {"before": sp.ppl_full, "after": sp.ppl[list(sp.ks).index(k)]}
                   for name, sp in ds.splits.items() if k in sp.ks}
        c = ds.contributions
    else:
        removed = tuple(sorted(int(i) for i in removed))
        measured = measure(run, removal_mask(removed, run.n_layers))[0]
        predicted, rule, heldout = None, "chosen by hand", {}
        c = None
    ppl_full = float(run.store.meta().get("ppl_full") or _measure_fn(run)(removal_mask((), run.n_layers)[None])[0])
    extra = {
        "method": rule,
        **manifest_contributions(c),
        "perplexities": {"calibration": {"before": ppl_full, "after": measured}, **heldout},
        "ppl_predicted": predicted,
        "surrogate": (art.get("report") or {}).get("test", {}),
        "method_spec": dataclasses.asdict(method),
        "run_id": run.run_id,
        "data": run.spec.data.source,
        "data_hash": run.windows.data_hash,
        "seeds": {"sampling": run.spec.sampling.seed, "data": run.spec.data.seed},
        "n_masks_evaluated": int(run.store.count()),
    }
    if fmt == "gguf":
        return _export_gguf(run, removed, out_dir, quant, overwrite, extra, ppl_full, measured)
    result = prune_model(run.lm, removed, out_dir, manifest_extra=extra, overwrite=overwrite,
                         verify_windows=run.windows.input_ids, expected_ppl=measured)
    out = {"run_id": run.run_id, "out": str(result.out_dir), "k": len(removed), "removed": list(removed),
           "ppl_full": ppl_full, "ppl_measured": measured,
           "verification": None if result.verification is None else dataclasses.asdict(result.verification),
           "format": "folder", "verified": result.verification is not None and result.verification.ok}
    run.store.put_artifact("export", out)
    return out


def _export_gguf(run: OpenRun, removed, out, quant: str, overwrite: bool, extra: dict, ppl_full: float,
                 measured: float) -> dict:
    from engine.gguf_export import export_gguf, manifest_path
    from engine.presets import PRESETS

    preset = PRESETS.get(run.spec.model.name)
    m = export_gguf(run.lm, removed, out, quant, manifest_extra=extra, overwrite=overwrite,
                    verify_windows=run.windows.input_ids, expected_ppl=measured,
                    tokenizer_pre=preset.gguf_tokenizer_pre if preset else "gpt2")
    v = m["verification"]
    out = {"run_id": run.run_id, "format": "gguf", "quant": quant, "out": str(out), "manifest": str(manifest_path(Path(out))),
           "size_bytes": m["size_bytes"], "sha256": m["sha256"], "k": len(m["removed_layers"]),
           "removed": m["removed_layers"], "ppl_full": ppl_full, "ppl_measured": measured, "verified": bool(v["ok"]),
           "ppl_rel_diff": v["ppl_rel_diff"], "reload_rtol": m["reload_rtol"], "fallback_tensors": m["fallback_tensors"],
           "tensor_types": m["tensor_types"], "verification": v}
    run.store.put_artifact("export", out)
    return out


def prune(spec: RunSpec, method: MethodSpec = MethodSpec(), out_dir=None, overwrite: bool = False,
          eval_data: tuple[str, ...] = (), cache_dir=None, run: OpenRun | None = None, sampled=None,
          evaluation: EvalSpec = EvalSpec(), progress: bool = False, json_mode: bool = False) -> dict:
    """fit -> contributions -> decide (k = remove, plus --ks / --all-k) -> export (if out_dir) on the run's
    samples; with `progress`, the decision's progress on stderr (StepProgress)."""
    from engine.export import check_export_folder

    t0 = time.monotonic()
    if run is None:  # every option, the export folder included, before any model is loaded
        validate.check_run(spec, remove=method.remove, out_dir=out_dir, overwrite=overwrite, cache_dir=cache_dir)
        run = open_run(spec, cache_dir, evaluation, create=False, checked=True)  # analysis: never creates a run
    elif out_dir is not None:
        check_export_folder(out_dir, overwrite)
    return prune_run(run, method, out_dir, overwrite, eval_data, sampled, progress, json_mode, t0)


def prune_run(run: OpenRun, method: MethodSpec, out_dir=None, overwrite: bool = False, eval_data: tuple[str, ...] = (),
              sampled=None, progress: bool = False, json_mode: bool = False, t0: float | None = None) -> dict:
    """`prune` on an opened run whose options (and export folder) the caller has checked; `sampled`: the
    SampleResult of this command's sampling (run_all), `t0`: when the command started."""
    from engine.method import check_ks

    t0 = time.monotonic() if t0 is None else t0
    remove = default_remove(method, run.n_layers)
    check_ks(method.decide_ks(run.n_layers), run.n_layers)
    stages: dict[str, float] = {}
    t = time.monotonic()
    f = _fit(run, method)
    stages["fit"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    f, c = _contributions(run, method)
    stages["contributions"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    _, _, ds, cost = _decide(run, method, method.decide_ks(run.n_layers), eval_data, fc=(f, c),
                             progress=StepProgress("decide", progress, json_mode))
    stages["decide"] = round(time.monotonic() - t, 3)
    exported = None
    if out_dir is not None:
        t = time.monotonic()
        exported = _export(run, method, out_dir, overwrite, ds, remove)
        stages["export"] = round(time.monotonic() - t, 3)
    return prune_record(run, method, f, c, ds, cost, remove, sampled, exported, stages, t0)


def run_all(spec: RunSpec, method: MethodSpec = MethodSpec(), out_dir=None, overwrite: bool = False,
            eval_data: tuple[str, ...] = (), cache_dir=None, progress: bool = True, json_mode: bool = False,
            evaluation: EvalSpec = EvalSpec()) -> dict:
    """The whole method in one resumable command: sample -> fit -> contributions -> decide -> export.

    Sampling is one pass unless `evaluation.single_pass` is False: nothing is fitted before every
    mask is in, so the order masks are stored in does not matter and the fewest layer calls win."""
    from engine.method import check_ks

    t0 = time.monotonic()
    # Every option, the export folder included, once: before minutes of sampling, not after.
    validate.check_run(spec, remove=method.remove, out_dir=out_dir, overwrite=overwrite, cache_dir=cache_dir)
    if evaluation.single_pass is None:
        evaluation = dataclasses.replace(evaluation, single_pass=True)
    run = open_run(spec, cache_dir, evaluation, checked=True)
    check_ks(method.decide_ks(run.n_layers), run.n_layers)  # before sampling, not after (--ks too)
    sampled = sample(spec, cache_dir, progress=progress, json_mode=json_mode, run=run, evaluation=evaluation)
    if sampled.stopped:
        raise WorkbenchError(
            f"sampling was {sampled.stopped} after {sampled.total}/{sampled.target} masks; everything evaluated is "
            "kept in the run store. Run the same command again to resume."
        )
    result = prune_run(run, method, out_dir, overwrite, eval_data, sampled, progress=progress, json_mode=json_mode)
    counters = ("layer_calls", "leaves", "work", "work_total", "completed", "partial", "rounds")
    result["sampling"] = {k: v for k, v in sampled.to_json().items() if k in counters}
    result["seconds"] = round(time.monotonic() - t0, 3)
    result["stage_seconds"] = result["stages"] = {"sample": sampled.seconds, **result["stage_seconds"]}
    return result


def baseline(spec: RunSpec, names, k_max: int | None = None, seed: int = 0, cache_dir=None,
             evaluation: EvalSpec = EvalSpec(), progress: bool = False) -> dict:
    """Static criteria on the calibration windows: per-layer scores and removal order of each.

    When the run of `spec` exists in the cache, each result is stored there as artifact
    ``baseline:<name>`` as soon as it is done (the app shows them beside the contributions);
    with `progress`, one JSON progress line per finished criterion goes to stderr."""
    from engine.baselines import run_baseline

    names = [names] if isinstance(names, str) else list(names)
    validate.check_run(spec)
    lm, windows = _load(spec, evaluation)
    run_id = spec.run_id(lm.identity, windows.data_hash)
    store = RunStore(cache_dir, run_id) if RunStore(cache_dir, run_id).exists() else None
    results = {}
    bar = StepProgress("baselines", progress, json_mode=True)
    for i, name in enumerate(names):
        t = time.monotonic()
        bar.at(i, len(names), f"running {name}")
        r = run_baseline(name, lm, windows, k_max=k_max, seed=seed,
                         progress=lambda done, total, words: bar.at(done, total, f"{name}: {words}")).to_json()
        results[name] = r
        if store is not None:
            store.put_artifact(f"baseline:{name}", r)
        bar.at(i + 1, len(names), f"ran {name} ({time.monotonic() - t:.1f} s)")
    first = results[names[0]]
    out = {"model": spec.model.name, "data": spec.data.source, "n_layers": lm.n_layers,
           "run_id": run_id if store else None, **(first if len(names) == 1 else {})}
    if len(names) > 1:
        out["results"] = results
    return out


def summarize(run: OpenRun, method: MethodSpec = MethodSpec(), prompt: str | None = None, out_html=None,
              progress: bool = False, json_mode: bool = False) -> dict:
    """The stakeholder summary of the decision for k = method.remove (engine.html_report has the record's
    contract); measures the full and the pruned model here, stores artifact ``summary:<hash>`` and,
    with `out_html`, writes the self-contained HTML report there (after the artifact; the caller checks the
    path first, `atomic.check_output_file`: the CLI, before opening the run). `progress`: one StepProgress
    line per step (baselines' curves, paired perplexities per split, size and speed, generation)."""
    import platform

    from engine import footprint, html_report
    from engine.decision import removal_mask
    from engine.estimators import get as estimator

    ESTIMATOR_LABEL = lambda name: estimator(name).label  # noqa: E731
    decisions = stored(run, "decisions", method)
    k = default_remove(method, run.n_layers)
    if not decisions or k not in decisions["ks"]:
        raise EstimationError(f"no decision for k = {k} with these settings yet: run `python -m engine prune "
                              f"--remove {k}` (or Decide on the Prune page) first.")
    d = next(x for x in decisions["decisions"] if x["k"] == k)
    removed = tuple(d["removed"])
    ks = decisions["ks"]
    bar = StepProgress("report", progress, json_mode)
    n_steps = 4 + len(decisions["splits"])
    bar.at(0, n_steps, "measuring the baselines' sets on the calibration windows")
    curves = {"method": [{"k": x["k"], "ppl": x["ppl_measured"]} for x in decisions["decisions"]]}
    baselines = {name.split(":", 1)[1]: run.store.get_artifact(name) for name in run.store.artifact_names()
                 if name.startswith("baseline:")}
    sets = [(name, kk, tuple(b["order"][:kk])) for name, b in baselines.items() for kk in ks
            if len(b.get("order") or ()) >= kk]
    if sets:
        measured = _measure_fn(run)(np.stack([removal_mask(s, run.n_layers) for _, _, s in sets]))
        for (name, kk, _), ppl in zip(sets, measured):
            curves.setdefault(name, []).append({"k": kk, "ppl": float(ppl)})
    bar.at(1, n_steps, "full and pruned perplexity on the calibration windows")
    ppl = {"calibration": _paired_change(run, removed, None, method.level)}
    for i, (name, sp) in enumerate(decisions["splits"].items()):
        bar.at(2 + i, n_steps, f"full and pruned perplexity on {name}")
        if k in sp["ks"]:
            ppl[name] = _paired_change(run, removed, name, method.level)
    ids = run.windows.input_ids
    if prompt is None and run.lm.tokenizer is not None:  # the start of a prose line of the held-out text
        from engine.data import make_windows

        splits = [name for name in decisions["splits"] if name in ppl]
        source = run.windows if not splits else make_windows(
            run.lm.tokenizer, dataclasses.replace(run.spec.data, source=splits[0]))
        prompt = html_report.default_prompt(run.lm.tokenizer.batch_decode(source.input_ids, skip_special_tokens=True))
    fit = stored(run, "fit", method) or {}
    bar.at(n_steps - 2, n_steps, "size and speed of the full and the pruned model")
    footprints = {"full": footprint.measure(run.lm, ids).to_dict(),
                  "pruned": footprint.measure(run.lm, ids, removed).to_dict()}
    speed = footprint.compare_speed(run.lm, ids, removed).to_dict()
    bar.at(n_steps - 1, n_steps, "generating from the full and the pruned model")
    record = {
        "run_id": run.run_id, "model": run.spec.model.name, "family": run.lm.family, "n_layers": run.n_layers,
        "n_masks": run.store.count(), "k": k, "removed": list(removed), "rule": d["method"],
        "splits_order": [n for n in decisions.get("splits_measured") or decisions["splits"] if n in ppl],
        "estimator": ESTIMATOR_LABEL(method.estimator), "r2": fit.get("r2"),
        "n_heldout": ((fit.get("report") or {}).get("split") or {}).get("n_test"),
        "ppl": ppl, "curves": curves,
        "footprint": footprints,
        "speed": speed,
        "generation": {"prompt": prompt, "full": "".join(footprint.generate(run.lm, prompt)),
                       "pruned": "".join(footprint.generate(run.lm, prompt, removed))} if run.lm.tokenizer else None,
        "machine": f"{platform.machine()} {platform.system()}, {run.lm.device}, torch threads "
                   f"{__import__('torch').get_num_threads()}",
        "method_spec": dataclasses.asdict(method),
        "zeroshot": stored_zeroshot_pair(run.lm, removed, run.store.cache_dir),
        "healing": run.store.get_artifact(heal_name(removed, run.n_layers)),  # the report's before/after healing
    }
    bar.at(n_steps, n_steps, "summary built")
    _put(run, "summary", method, run.store, record)
    if out_html is not None:
        atomic.write_atomic(out_html, html_report.to_html(record))  # a kill or a full disk leaves no half file
        record = {**record, "html": str(out_html)}
    return record


def _paired_change(run: OpenRun, removed: tuple[int, ...], split: str | None, level: float) -> dict:
    """Perplexity of the full and the pruned model on the same windows (the run's calibration windows, or
    those of held-out text `split`), with the paired bootstrap interval of their ratio over the windows."""
    from engine.data import make_windows
    from engine.decision import removal_mask
    from engine.evaluate import MaskEvaluator
    from engine.uncertainty import compare_candidates

    windows = run.windows if split is None else make_windows(
        run.lm.tokenizer, dataclasses.replace(run.spec.data, source=split))
    masks = np.stack([np.ones(run.n_layers, dtype=bool), removal_mask(removed, run.n_layers)])  # (2, L)
    nll, tokens = MaskEvaluator(run.lm, windows).window_losses(masks)  # (2, W) each
    cmp = compare_candidates([(), tuple(removed)], nll, tokens, level=level, chosen=0)
    return {"before": cmp.ppl[0], "after": cmp.ppl[1], "ratio": cmp.ratio[1], "ratio_low": cmp.ci_low[1],
            "ratio_high": cmp.ci_high[1], "level": level, "n_windows": int(nll.shape[1])}


def generate(run: OpenRun, prompt: str, removed=(), max_new_tokens: int = 40, seed: int = 0):
    """Greedy text of the model without `removed`, streamed piece by piece (the Summary page)."""
    from engine import footprint

    return footprint.generate(run.lm, prompt, tuple(removed), max_new_tokens, seed)
