"""The one orchestrator: every stage as a resumable step over a run store.

The CLI, the app's pages and the benchmarks call these functions and nothing below them, so
the same specs give the same numbers everywhere. Each function takes frozen specs
(engine.config), returns a JSON-able dict (the CLI's ``--json`` line) and stores what it
computed in the run's store:

* ``open_run(spec, cache_dir)``: load model and calibration windows, derive the run id,
  open (or create) the run store.
* ``sample(spec, cache_dir)``: evaluate the run's first ``n_masks`` masks that the store lacks,
  committing each as it finishes; cancel and Ctrl-C stop cleanly, a rerun resumes.
* ``fit`` / ``contributions`` / ``decide`` / ``export`` / ``prune`` / ``run_all``: stage 2
  (engine.method's pure functions) on the run's samples. Results are artifacts keyed by the
  spec that produced them (``fit:<hash>``, ``contributions:<hash>``, ``decisions:<hash>``;
  `artifact_name`), each holding its ``spec`` and the ``n_masks`` it saw, so a result for one
  spec never replaces another's and a reader can tell a stale result (fewer masks than the
  store now holds) from a current one. ``stored(run, stage, method_spec)`` reads them.
* ``info``, ``baseline``, ``measure``, ``status``; ``sampling_progress(run)``: rounds, fidelity and
  work of every stored row (the app's Sampling page).

The package's modules, one concern each (this file re-exports their names, so callers write
``from engine import pipeline`` and ``pipeline.<name>`` as before):

* ``run``: open a run once (load, validate once, derive the id, open the store), ``info``, ``status``;
* ``artifacts``: the one home of spec -> artifact name -> staleness;
* ``progress``: the progress lines on stderr (sampling bar, stage steps, healing);
* ``collect``: sampling, rounds, multi-fidelity completion, the run's samples;
* ``results``: one builder per JSON record;
* ``stages``: fit, contributions, decide, measure, interactions, candidates;
* ``downstream``: zero-shot accuracy of model choices;
* ``exporting``: export, prune, run_all, baseline, summarize (not ``export.py``: the package's
  ``export`` is the function);
* ``healing``: LoRA healing of a pruned model.

Imports of torch-backed modules are inside the functions: ``python -m engine status`` and
``--help`` import this package without loading torch, scikit-learn or scipy.
"""

from engine.config import (DataSpec, EvalSpec, INTERACTION_FOLDS, INTERACTION_SURROGATE, MethodSpec,
    ModelSpec, RunSpec, stable_hash)  # noqa: F401
from engine.errors import (EstimationError, InputError, WorkbenchError)  # noqa: F401
from engine.store import (list_runs, RunStore)  # noqa: F401
from engine.pipeline.run import (check_sampling, info, _load, load, open_run, OpenRun, set_threads, status)  # noqa: F401
from engine.pipeline.artifacts import (artifact_name, candidates_name, heal_name, interactions_name, _seen,
    STAGES, _stale, stored, stored_candidates, stored_interactions, zeroshot_name)  # noqa: F401
from engine.pipeline.progress import StepProgress  # noqa: F401
from engine.pipeline.collect import (_chunks, _committee, FIRST_CHUNK, sample, SampleResult, samples,
    sampling_progress)  # noqa: F401
from engine.pipeline.stages import (baseline_candidates, CANDIDATE_BASELINES, candidates, contributions,
    _decide, decide, default_remove, estimand, fit, _FITS, heldout_predictions, interaction_indices,
    interactions, measure, _measure_fn, measure_pair, MIN_VAL_WINDOWS, predict_ppl, predicted_pair_at_full,
    work_curve, write_interactions_csv)  # noqa: F401
from engine.pipeline.downstream import (_cache_root, evaluate_choice, ModelChoice, parse_choice,
    resolve_choice, RUN_CHOICES, stored_baseline_names, stored_zeroshot, stored_zeroshot_pair,
    zeroshot_data_missing, ZEROSHOT_DIR, zeroshot_eval, zeroshot_store, zeroshot_table)  # noqa: F401
from engine.pipeline.exporting import (baseline, export, export_run, generate, prune, prune_run, run_all,
    summarize)  # noqa: F401
from engine.pipeline.healing import heal  # noqa: F401
