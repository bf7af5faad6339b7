"""Which spec fields each command takes, and the argv that rebuilds a spec for a command.

The one table both the CLI (engine/cli.py builds each command's options from it) and the app's
background jobs (engine/views.job_argv) read, so neither imports the other. Groups of hand-built
options (--removed, report, fetch, ...) are named here too and built by the CLI.
"""

from __future__ import annotations

import dataclasses

from engine.config import (BaselineSpec, CandidateSpec, DataSpec, EvalSpec, ExportSpec, HealSpec, InteractionSpec,
                           MethodSpec, ModelSpec, SamplingSpec, SurrogateSpec, ZeroShotSpec, spec_argv)

_ESTIMATE = ("estimator", "budget", "mc_seed", "level", "boot", "window_boot")
# Option groups declared by specs: name -> (spec class, title, fields shown or None for all).
SPEC_GROUPS: dict[str, tuple[type, str, tuple[str, ...] | None]] = {
    "model": (ModelSpec, "model", None),
    "data": (DataSpec, "calibration data", None),
    "sampling": (SamplingSpec, "mask sampling", None),
    "evaluation": (EvalSpec, "evaluation (speed and memory only; the same perplexities)", None),
    "threads": (EvalSpec, "evaluation", ("threads",)),
    "surrogate": (SurrogateSpec, "surrogate", None),
    "estimate": (MethodSpec, "contributions", _ESTIMATE),
    "method": (MethodSpec, "contributions and pruning", None),
    "interactions": (InteractionSpec, "interactions", None),
    "mc": (MethodSpec, "Monte Carlo (above 22 layers, or when --budget is given)", ("budget", "mc_seed")),
    "candidates": (CandidateSpec, "near-optimal sets", None),
    "remove": (MethodSpec, "removal", ("remove",)),
    "baseline": (BaselineSpec, "baseline", None),
    "healing": (HealSpec, "healing (LoRA on every linear layer of the kept decoder layers)", None),
    "zeroshot": (ZeroShotSpec, "zero-shot tasks (lm-eval)", None),
    "export": (ExportSpec, "export and held-out text", ("out", "overwrite", "eval_data")),
    "format": (ExportSpec, "format", ("format", "quant")),
}

_RUN = ("model", "data", "sampling")
# Command -> its option groups, in the order --help shows them.
COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "sample": (*_RUN, "evaluation"),
    "info": ("model", "data", "threads"),
    "status": (),
    "fit": (*_RUN, "surrogate", "fit", "threads"),
    "shapley": (*_RUN, "surrogate", "estimate", "threads"),
    "prune": (*_RUN, "surrogate", "method", "export", "threads"),
    "run": (*_RUN, "evaluation", "surrogate", "method", "export"),
    "export": (*_RUN, "surrogate", "method", "removed", "export", "format", "threads"),
    "report": (*_RUN, "surrogate", "method", "report", "threads"),
    "interactions": (*_RUN, "surrogate", "mc", "interactions", "threads"),
    "candidates": (*_RUN, "surrogate", "remove", "candidates", "threads"),
    "baselines": (*_RUN, "baseline", "threads"),
    "demo-run": (),
    "heal": (*_RUN, "surrogate", "method", "heal-layers", "healing", "export", "threads"),
    "evaluate": (*_RUN, "surrogate", "method", "threads", "zeroshot", "zeroshot_which"),
    "fetch": ("fetch",),
}


def command_argv(name: str, *specs, cache_dir=None, extra: tuple[str, ...] = ()) -> list[str]:
    """argv after `python -m engine` for command `name` with the settings of `specs` (RunSpec,
    MethodSpec, EvalSpec, ...): only the fields that command takes, non-default values only, and
    --json (the app's background jobs read its last line). KeyError for a command not in the table."""
    taken = set()
    for g in COMMAND_GROUPS[name]:
        if g in SPEC_GROUPS:
            cls, _, only = SPEC_GROUPS[g]
            taken |= {(cls, f.name) for f in dataclasses.fields(cls) if only is None or f.name in only}
    argv = [name, "--json"] + (["--cache-dir", str(cache_dir)] if cache_dir is not None else [])
    for spec in specs:
        argv += spec_argv(spec, keep=lambda cls, field: (cls, field) in taken)
    return argv + list(extra)
