"""Open a run once: load the model and windows (validated once, before any weight is read), derive
the run id, open the store. `OpenRun` is what every stage takes; `info` and `status` need no run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from engine import validate
from engine.config import DataSpec, EvalSpec, ModelSpec, RunSpec
from engine.errors import EstimationError
from engine.store import RunStore, list_runs


def set_threads(n: int | None) -> None:
    """CPU threads for torch (None: torch's choice). On an oversubscribed machine fewer threads
    can be much faster; bench/README.md has the figures."""
    if n:
        import torch

        torch.set_num_threads(int(n))


@dataclass
class OpenRun:
    """A run ready for work: the loaded model, its windows and the run store."""

    spec: RunSpec
    lm: object  # models.LoadedModel
    windows: object  # data.Windows
    run_id: str
    store: RunStore

    @property
    def n_layers(self) -> int:
        return self.lm.n_layers


def load(spec: RunSpec, evaluation: EvalSpec = EvalSpec(), weights: bool = True, checked: bool = False) -> tuple:
    """(LoadedModel, Windows) of a spec; checks the sampling settings against L. Writes nothing.
    weights=False: the model without weights (distributed.driver_model; a GGUF file, which has no
    config to build an empty model from, is loaded whole), for a driver whose Ray workers load the
    model themselves, or a stage that never runs it. checked=True: the caller has run `validate.check_run` on
    `spec` already (a run is validated once)."""
    if not checked:
        validate.check_run(spec)  # every option against the model's config, before any weight is loaded
    lm, windows = _load(spec, evaluation, weights)
    check_sampling(spec.sampling, lm.n_layers)
    return lm, windows


def check_sampling(sampling, n_layers: int) -> None:
    """SamplingError unless `sampling` can draw masks for an n_layers model (no model needed)."""
    from engine.sampling import sample_masks

    sample_masks(dataclasses.replace(sampling, n_masks=0), n_layers)


def open_run(spec: RunSpec, cache_dir=None, evaluation: EvalSpec = EvalSpec(), create: bool = True,
             loaded: tuple | None = None, checked: bool = False, weights: bool = True) -> OpenRun:
    """Load model and windows (or take `loaded` from `load`), derive the run id (model identity,
    data hash, sampling), open the store.

    `create=False` (what the app's pages use to look) never writes to the cache: a run that was
    never sampled raises EstimationError instead of appearing as an empty run. `checked=True`: the
    caller validated `spec` and `cache_dir` with `validate.check_run` (nothing is validated twice).
    `weights=False`: the model without its weights (`load`), for stages that work on the stored samples
    only (fit, contributions, interactions, candidates): the same run id, no minutes of loading a large
    model that nothing runs; a stage that then tries to run it fails on the meta device."""
    from engine.export import package_versions

    if not checked:
        validate.check_cache_dir(cache_dir)
    lm, windows = loaded or load(spec, evaluation, weights=weights, checked=checked)
    run_id = spec.run_id(lm.identity, windows.data_hash)
    if not create and not RunStore(cache_dir, run_id).exists():
        raise EstimationError(f"run {run_id} has no evaluated masks yet: start sampling first (Sampling page, or "
                              "`python -m engine sample` with the same settings).")
    meta = {
        "spec": dataclasses.asdict(spec),
        "model": spec.model.name,
        "model_identity": lm.identity,
        "family": lm.family,
        "data": spec.data.source,
        "data_hash": windows.data_hash,
        "n_layers": lm.n_layers,
        "versions": package_versions(),
    }
    store = RunStore.open(cache_dir, run_id, meta)
    return OpenRun(spec=spec, lm=lm, windows=windows, run_id=run_id, store=store)


def info(model_spec: ModelSpec, data_spec: DataSpec, evaluation: EvalSpec = EvalSpec()) -> dict:
    """Model family, size, class, dtype, device, identity and its perplexity on the data's windows."""
    from engine.data import make_windows
    from engine.evaluate import MaskEvaluator
    from engine.models import is_gguf, load_model

    set_threads(evaluation.threads)
    validate.check_run(RunSpec(model=model_spec, data=data_spec))
    lm = load_model(model_spec)
    windows = make_windows(lm.tokenizer, data_spec)
    ppl = float(MaskEvaluator(lm, windows).ppl_full)
    return {
        "model": model_spec.name,
        "family": lm.family,
        "model_class": type(lm.model).__name__,
        "n_layers": lm.n_layers,
        "n_params": lm.n_params,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "device": str(lm.device),
        "identity": lm.identity,
        "data": data_spec.source,
        "data_hash": windows.data_hash,
        "n_windows": int(windows.input_ids.shape[0]),
        "seq_len": int(windows.input_ids.shape[1]),
        "ppl": ppl,
    }


def status(cache_dir=None) -> list[dict]:
    """One dict per run store under cache_dir (see store.RunSummary), most recent first."""
    validate.check_cache_dir(cache_dir)  # a regular file: exit 5, as `sample` says
    root = Path(cache_dir) if cache_dir is not None else None
    return [dataclasses.asdict(s) for s in list_runs(root)]


def _load(spec: RunSpec, evaluation: EvalSpec, weights: bool = True):
    from engine.data import make_windows
    from engine.models import is_gguf, load_model

    set_threads(evaluation.threads)
    if weights or is_gguf(spec.model):
        lm = load_model(spec.model)
    else:
        from engine.distributed import driver_model

        lm = driver_model(spec.model)
    windows = make_windows(lm.tokenizer, spec.data)
    if weights:
        from engine.load_checks import check_ids_fit

        check_ids_fit(spec.model.name, windows.input_ids, lm.model, spec.data.source)
    return lm, windows
