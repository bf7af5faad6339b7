"""LoRA healing (engine/heal.py) of a pruned model: the run's decision, a layer set or an export folder,
measured before and after, exported like any export."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from engine import validate
from engine.config import EvalSpec, MethodSpec, RunSpec
from engine.pipeline.run import OpenRun, load, open_run
from engine.pipeline.artifacts import heal_name, stored
from engine.pipeline.progress import StepProgress, _HealProgress
from engine.pipeline.stages import _decide


def _export_manifest(model_name: str) -> dict | None:
    """The pruning manifest of `model_name` when it is an export folder of this tool, else None."""
    from engine.export import MANIFEST

    path = Path(model_name) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _decision_for(run: OpenRun, method: MethodSpec, k: int) -> tuple[tuple[int, ...], str]:
    """(removed, rule) of the run's decision for k: the stored decisions when current, else decided now."""
    art = stored(run, "decisions", method)
    if art and not art["stale"] and k in art.get("ks", []):
        d = next(d for d in art["decisions"] if d["k"] == k)
        return tuple(int(i) for i in d["removed"]), d["method"]
    _, _, ds, _ = _decide(run, method, (k,))
    d = ds.for_k(k)
    return tuple(int(i) for i in d.removed), d.method


def heal(spec: RunSpec, method: MethodSpec, healing, out_dir=None, removed=None, overwrite: bool = False,
         eval_data: tuple[str, ...] = (), cache_dir=None, evaluation: EvalSpec = EvalSpec(), progress: bool = True,
         json_mode: bool = False) -> dict:
    """LoRA healing (engine/heal.py) of the model without `removed`, or of the run's decision for
    `method.remove`, or of an export folder as it is; measured before/after on held-back windows of the
    healing text and on the held-out texts; exported (merged, verified by a fresh-process reload) to
    `out_dir` when given. Resumes from the cache's checkpoint of the same settings after a kill."""
    import dataclasses as dc

    from engine import heal as heal_lib
    from engine.config import HEAL_STEPS, default_cache_dir
    from engine.data import load_text, make_windows, tokenizer_hash
    from engine.decision import removal_mask
    from engine.errors import InputError
    from engine.method import DEMO_EVAL_SPLITS, eval_splits_for
    from engine.export import check_export_folder, package_versions, prune_model

    t0 = time.monotonic()
    if out_dir is not None:
        check_export_folder(out_dir, overwrite, source=spec.model.name)  # before any model is loaded
    heal_source = healing.data or spec.data.source
    text_field = spec.data.text_field
    heal_text = load_text(heal_source, text_field)
    checked = tuple(dict.fromkeys((*DEMO_EVAL_SPLITS, *eval_data)))
    overlap, warnings = heal_lib.check_overlap(heal_source, heal_text, {n: load_text(n, text_field) for n in checked},
                                               healing.allow_overlap)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    measured = tuple(n for n in eval_splits_for(dc.replace(spec.data, source=heal_source), tuple(eval_data))
                     if n != heal_source)
    source_manifest = _export_manifest(spec.model.name)
    run, rule = None, "chosen by hand"
    if removed is not None:
        validate.check_run(spec, remove=len(set(removed)), cache_dir=cache_dir)
        lm, _ = load(spec, evaluation, checked=True)
    elif method.remove is not None:
        validate.check_run(spec, remove=method.remove, cache_dir=cache_dir)
        run = open_run(spec, cache_dir, evaluation, create=False, checked=True)  # the decision needs the samples
        lm = run.lm
        removed, rule = _decision_for(run, method, method.remove)
    elif source_manifest is not None:
        validate.check_run(spec, cache_dir=cache_dir)
        lm, _ = load(spec, evaluation, checked=True)
        removed, rule = (), "the export's own layers"
    else:
        raise InputError("say which layers to remove before healing: --remove K (the run's decision for K layers), "
                         "--removed 2,3,5 (0-based), or --model an export folder (healed as it is).")
    L = lm.n_layers
    removed = tuple(sorted(int(i) for i in removed))
    bad = [i for i in removed if not 0 <= i < L]
    if bad or len(set(removed)) != len(removed) or len(removed) >= L:
        raise InputError(f"--removed {','.join(map(str, removed))}: the model has layers 0..{L - 1}; give distinct "
                         "layers and keep at least one.")
    kept = [i for i in range(L) if i not in set(removed)]
    mask = removal_mask(removed, L)
    T = healing.seq_len or spec.data.seq_len
    hw = heal_lib.healing_windows(lm.tokenizer, heal_text, T, healing.held_back, healing.seed)
    steps = heal_lib.total_steps(healing, len(hw.train), HEAL_STEPS)
    evals = {}
    for name in measured:
        text = load_text(name, text_field)
        n_tok = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        n = min(healing.eval_windows, n_tok // spec.data.seq_len)
        evals[name] = make_windows(lm.tokenizer, dc.replace(spec.data, source=name, n_windows=max(1, n)),
                                   text=text).input_ids
    splits = {"heal": hw.held_back, **evals}
    before = {name: heal_lib.window_losses(lm, w, mask) for name, w in splits.items()}

    cache = Path(cache_dir).resolve() if cache_dir else default_cache_dir()
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    key = heal_lib.checkpoint_key(lm.identity, kept, L, healing, hw.text_sha256, tokenizer_hash(lm.tokenizer), dtype, T)
    checkpoint = heal_lib.HealCheckpoint(cache / "heal" / key, key)
    outcome = heal_lib.heal_model(lm, kept, hw, healing, steps, checkpoint, _HealProgress(progress, json_mode),
                                  phase=StepProgress("heal", progress, json_mode).at)
    after = {name: heal_lib.window_losses(lm, w, mask) for name, w in splits.items()}
    results = {name: heal_lib.compare(before[name][:2], after[name][:2], before[name][2], method.level,
                                      method.mc_seed) for name in splits}
    h = results["heal"]
    import peft

    settings = {**dc.asdict(healing), "lora_alpha": healing.lora_alpha, "seq_len": T, "steps": steps,
                "warmup": heal_lib.WARMUP, "optimizer": "AdamW (weight decay 0, grad-norm clip 1.0)",
                "target_modules": len(outcome.target_modules), "trainable_params": outcome.trainable_params}
    out = {
        "model": spec.model.name, "run_id": run.run_id if run else None, "n_layers": L, "removed": list(removed),
        "kept": kept, "rule": rule, "heal_data": heal_source, "heal_data_sha256": hw.text_sha256,
        "n_train_windows": int(len(hw.train)), "n_held_back": int(len(hw.held_back)),
        "steps": steps, "resumed_from": outcome.resumed_from, "steps_run": steps - outcome.resumed_from,
        "train_seconds": round(outcome.seconds, 2), "loss_first": outcome.loss_first, "loss_last": outcome.loss_last,
        "ppl_full": h["ppl_full"], "ppl_before": h["ppl_before"], "ppl_after": h["ppl_after"],
        "recovered": h["recovered"], "heldout": {n: r for n, r in results.items() if n != "heal"},
        "held_back": h, "overlap": overlap, "warnings": warnings, "settings": settings,
        "checkpoint": str(checkpoint.path), "out": None, "verified": None, "verification": None,
    }
    if out_dir is not None:
        extra = {
            "method": f"{rule}, then LoRA healing",
            "perplexities": {f"{heal_source} (held back)" if n == "heal" else n:
                             {"before": r["ppl_full"], "after": r["ppl_after"]} for n, r in results.items()},
            "healing": {**settings, "data": heal_source, "data_sha256": hw.text_sha256, "tokenizer": tokenizer_hash(
                lm.tokenizer), "loss_first": outcome.loss_first, "loss_last": outcome.loss_last,
                "seconds": round(outcome.seconds, 2), "peft": peft.__version__, "results": results,
                "pruned_by": rule, "source_export": None if source_manifest is None else {
                    "folder": str(Path(spec.model.name).resolve()),
                    "removed_layers": source_manifest.get("removed_layers"),
                    "n_layers_original": source_manifest.get("n_layers_original")}},
            "run_id": out["run_id"],
            "versions_healing": {**package_versions(), "peft": peft.__version__},
        }
        result = prune_model(lm, removed, out_dir, manifest_extra=extra, overwrite=overwrite,
                             verify_windows=hw.held_back, expected_ppl=h["ppl_after"])
        ver = None if result.verification is None else dataclasses.asdict(result.verification)
        out.update(out=str(result.out_dir), verified=None if ver is None else bool(ver["ok"]), verification=ver)
    if run is not None:
        run.store.put_artifact(heal_name(removed, L), out)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out
