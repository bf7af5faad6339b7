"""Delete layers for real, fix the config, save a model that loads with plain transformers, verify it.

Contract of `prune_model(lm, removed, out_dir, ...)`:
- `lm` is an engine.models.LoadedModel (only `.model`, `.tokenizer`, `.adapter` are required;
  `.identity`, `.spec`, `.family` are used for the manifest when present). The adapter gives
  `layers(model)`, `set_layers(model, layers)`, `count_fields`, `per_layer_fields`.
- Memory: no weight is copied. Inside `pruned_view` the decoder ModuleList is swapped for the
  kept sub-list, per-layer index attributes (`layer_idx`, `layer_id`, `layer_index`, on every
  submodule of a kept layer: Llama/Qwen `self_attn`, GPT-2 `attn`, NeoX `attention`, OPT
  `self_attn`, Mamba block and `mixer`) are renumbered, and the config object is edited in place;
  everything is restored in `finally`, so the caller's model is unchanged afterwards.
- Config: every layer-count field (adapter's plus `num_hidden_layers`, `n_layer`, `num_layers`,
  `n_layers`) becomes the kept count; per-layer lists (adapter's plus `layer_types`) are
  sub-selected; Qwen's `max_window_layers` (an index threshold: layer i slides iff
  i >= max_window_layers) becomes the number of kept layers below it, so every kept layer keeps
  its attention type. List fields of length L that nothing knows how to update are listed in the
  manifest under `unhandled_per_layer_fields`.
- Folder policy: `out_dir` must be missing or empty. `overwrite=True` only replaces a previous
  export of this tool: the folder must contain `pruning_manifest.json`, and only the files that
  manifest lists are deleted (never recursively, never outside the folder); anything else in the
  folder is kept. Any other non-empty folder raises ExportError.
- Written: safetensors weights, config.json, generation_config.json, the tokenizer,
  `pruning_manifest.json` and a model card `README.md`.
- Verify (`verify=True`, needs `verify_windows`): a fresh Python process loads the folder with
  AutoModelForCausalLM/AutoTokenizer only (engine/_verify_export.py, run by path) and checks
  (a) perplexity on the windows equals the in-memory pruned model's (and `expected_ppl`, when
  given) to `rtol`, (b) generate() with the KV cache gives the same logits as a cache-free pass,
  (c) config layer count and layer indices are 0..k-1. Results go into ExportResult and the
  manifest; a failed check raises ExportError with the numbers (the folder is left for inspection).
  The fresh process loads the export in the model's dtype on the model's device (same kernels,
  so 1e-4 holds for bf16 too) and so briefly needs memory for a second, pruned copy there.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

import engine
from engine import _verify_export
from engine.errors import ExportError, ModelLoadError
from engine.masking import LAYER_INDEX_ATTRS, keep_only
from engine.models import unhandled_layer_fields

MANIFEST = "pruning_manifest.json"
MODEL_CARD = "README.md"
VERIFY_SCRIPT = Path(_verify_export.__file__).resolve()
# Keys prune_model writes itself; manifest_extra may not override them.
RESERVED_KEYS = (
    "format", "created", "base_model", "family", "model_type", "architecture", "n_layers_original",
    "n_layers", "kept_layers", "removed_layers", "mask", "config_changes", "unhandled_per_layer_fields",
    "renumbered_attributes", "versions", "verification", "files",
)  # fmt: skip


@dataclass(frozen=True)
class VerifyResult:
    """Fresh-process reload check of one export."""

    ok: bool
    ppl_reloaded: float
    ppl_in_memory: float
    ppl_rel_diff: float  # |reloaded - in_memory| / in_memory
    expected_ppl: float | None  # e.g. the decision's masked perplexity, when given
    expected_rel_diff: float | None
    kv_max_rel_diff: float  # generate() with cache vs. cache-free logits
    generated_tokens: int
    layer_indices: tuple[int, ...]  # per-layer index attributes found after reload
    n_layers_config: int
    tokenizer_ok: bool
    seconds: float  # reload + checks, in the fresh process
    problems: tuple[str, ...]  # empty when ok


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    kept: tuple[int, ...]
    removed: tuple[int, ...]
    n_layers_original: int
    config_changes: dict = field(hash=False)  # field -> {"before": ..., "after": ...}
    files: tuple[str, ...]
    manifest: dict = field(hash=False)
    verification: VerifyResult | None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"manifest value of type {type(o).__name__} is not JSON-able")


def _kept_from_removed(removed: Iterable[int], L: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    removed_list = [int(i) for i in removed]
    bad = [i for i in removed_list if not 0 <= i < L]
    if bad:
        raise ExportError(f"layers {bad} do not exist: the model has layers 0..{L - 1}.")
    if len(set(removed_list)) != len(removed_list):
        raise ExportError(f"removed layers {removed_list} contain duplicates.")
    rem = tuple(sorted(removed_list))
    kept = tuple(i for i in range(L) if i not in set(rem))
    if not kept:
        raise ExportError(f"removing all {L} layers leaves no model: keep at least one layer.")
    return kept, rem


@contextmanager
def pruned_view(model: nn.Module, adapter, kept: Sequence[int]):
    """Inside: `model` IS the pruned model (layers deleted, indices renumbered, config edited).

    Yields (config_changes {field: (before, after)}, unhandled list fields, renumbered count).
    No weight is copied; everything returns in `finally` (masking.keep_only does the surgery).
    """
    L = len(adapter.layers(model))
    mask = np.zeros(L, dtype=bool)
    mask[list(kept)] = True
    try:
        updates = adapter.config_updates(model.config, list(kept), L)
    except ModelLoadError as e:
        raise ExportError(str(e)) from e
    unhandled = unhandled_layer_fields(model.config, updates, L)
    with keep_only(model, adapter, mask, renumber=True):
        n_renumbered = sum(
            1 for j, i in enumerate(kept) for mod in adapter.layers(model)[j].modules() for a in LAYER_INDEX_ATTRS
            if isinstance(mod.__dict__.get(a), int) and not isinstance(mod.__dict__.get(a), bool))
        yield updates, unhandled, n_renumbered


def check_export_folder(out_dir, overwrite: bool) -> list[str]:
    """Raise ExportError unless `out_dir` may receive an export; changes nothing on disk.

    Returns the file names a previous export listed (what overwrite would replace)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; choose a folder path for the export.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return []
    if not overwrite:
        raise ExportError(f"{out_dir} is not empty; choose an empty folder or pass overwrite (--overwrite) to replace a previous export.")
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        raise ExportError(
            f"{out_dir} is not empty and holds no {MANIFEST}, so it is not a previous export; "
            "overwrite only replaces previous exports. Choose an empty or new folder."
        )
    try:
        return list(json.loads(manifest.read_text())["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{manifest} is unreadable ({e}); delete the folder yourself or choose another.") from e


def _prepare_folder(out_dir: Path, overwrite: bool) -> set[str]:
    """Make `out_dir` ready; returns names of files that were there and are kept."""
    listed = check_export_folder(out_dir, overwrite)
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return set()
    present = {p.name for p in out_dir.iterdir()}
    if not present:
        return set()
    for name in set(listed) | {MANIFEST}:
        p = out_dir / Path(name).name  # file names only: nothing outside the folder
        if p.is_file() or p.is_symlink():
            p.unlink()
    return {p.name for p in out_dir.iterdir()}


def package_versions() -> dict:
    """Versions recorded in run metas and export manifests (results depend on them)."""
    import transformers

    v = {"engine": engine.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
         "numpy": np.__version__, "python": platform.python_version()}  # fmt: skip
    try:
        import safetensors

        v["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    return v


def _base_model(lm) -> str | None:
    """Hub id of the source model when there is one (not the demo, not a local folder)."""
    spec = getattr(lm, "spec", None)
    name = getattr(spec, "name", None) or getattr(getattr(lm, "model", None), "name_or_path", None)
    if not name or name == "demo" or Path(name).exists() or name.count("/") != 1:
        return None
    return name


def verify_exports(
    jobs: Sequence[tuple[Path, torch.Tensor]],
    new_tokens: int = 4,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    timeout: float = 900,
) -> list[dict]:
    """Run the reload check for several exports in ONE fresh process; raw result dicts, in order.

    The fresh process loads each export in `dtype` on `device`: use the in-memory model's, so
    perplexities agree to 1e-4. It holds a second copy of the (pruned) weights while it runs.
    """
    with tempfile.TemporaryDirectory(prefix="verify-export-") as tmp:
        spec = []
        for n, (model_dir, windows) in enumerate(jobs):
            wpath = Path(tmp) / f"windows-{n}.pt"
            torch.save(windows.cpu().long().contiguous(), wpath)
            spec.append({"model_dir": str(Path(model_dir).resolve()), "windows": str(wpath), "new_tokens": new_tokens,
                         "dtype": str(dtype).removeprefix("torch."), "device": str(device)})  # fmt: skip
        jobs_path, results_path = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        jobs_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, str(VERIFY_SCRIPT), str(jobs_path), str(results_path)],
            capture_output=True, text=True, timeout=timeout, cwd=tmp,
        )  # fmt: skip
        if proc.returncode != 0 or not results_path.exists():
            raise ExportError(f"the reload check process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(results_path.read_text())


def judge(raw: dict, ppl_in_memory: float, n_kept: int, expected_ppl: float | None = None, rtol: float = 1e-4) -> VerifyResult:
    """Turn a raw reload-check dict into a VerifyResult, listing every failed check."""
    if "error" in raw:
        return VerifyResult(False, float("nan"), ppl_in_memory, float("nan"), expected_ppl, None, float("nan"), 0, (),
                            -1, False, 0.0, (f"reload failed: {raw['error']}",))  # fmt: skip
    problems = []
    rel = abs(raw["ppl"] - ppl_in_memory) / ppl_in_memory
    if not rel <= rtol:
        problems.append(f"reloaded perplexity {raw['ppl']:.6g} differs from in-memory {ppl_in_memory:.6g} (rel {rel:.2e} > {rtol:.0e})")
    exp_rel = None
    if expected_ppl is not None:
        exp_rel = abs(raw["ppl"] - expected_ppl) / expected_ppl
        if not exp_rel <= rtol:
            problems.append(f"reloaded perplexity {raw['ppl']:.6g} differs from the masked perplexity {expected_ppl:.6g} (rel {exp_rel:.2e} > {rtol:.0e})")
    if not raw["kv_max_rel_diff"] <= 1e-3:
        problems.append(f"generate() with KV cache disagrees with a cache-free pass (max rel logit diff {raw['kv_max_rel_diff']:.2e})")
    if raw["generated_tokens"] < 1:
        problems.append("generate() produced no tokens")
    if raw["n_layers_config"] != n_kept:
        problems.append(f"reloaded config has {raw['n_layers_config']} layers, expected {n_kept}")
    if raw["layer_indices"] and raw["layer_indices"] != list(range(n_kept)):
        problems.append(f"reloaded layer indices {raw['layer_indices']} are not 0..{n_kept - 1}")
    if not raw["tokenizer_ok"]:
        problems.append(f"tokenizer does not reload: {raw['tokenizer_error']}")
    return VerifyResult(
        ok=not problems,
        ppl_reloaded=raw["ppl"],
        ppl_in_memory=ppl_in_memory,
        ppl_rel_diff=rel,
        expected_ppl=expected_ppl,
        expected_rel_diff=exp_rel,
        kv_max_rel_diff=raw["kv_max_rel_diff"],
        generated_tokens=raw["generated_tokens"],
        layer_indices=tuple(raw["layer_indices"]),
        n_layers_config=raw["n_layers_config"],
        tokenizer_ok=raw["tokenizer_ok"],
        seconds=raw["seconds"],
        problems=tuple(problems),
    )


def _fmt(x) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def model_card(manifest: dict) -> str:
    """README.md with Hub front matter. Reads the manifest; optional extra keys it uses:
    `method`, `estimator`, `contributions` (list[L]), `perplexities` ({split: {"before", "after"}})."""
    front = ["---"]
    if manifest.get("base_model"):
        front.append(f"base_model: {manifest['base_model']}")
    front += ["library_name: transformers", "tags:", "- pruned", "- layer-pruning", "---", ""]
    L, k = manifest["n_layers_original"], manifest["n_layers"]
    name = manifest.get("base_model") or manifest.get("model_identity") or "the source model"
    lines = [
        f"# {name} with {L - k} of {L} decoder layers removed",
        "",
        f"Removed layers (0-based, original numbering): {manifest['removed_layers']}.  ",
        f"Kept layers: {manifest['kept_layers']} (renumbered 0..{k - 1}). Keep-mask: `{manifest['mask']}`.",
        "",
        "The layers were deleted (not zeroed) and the config updated "
        f"({', '.join(manifest['config_changes']) or 'no fields'}), so this folder loads with plain transformers.",
        "",
        "## Why these layers",
        "",
        f"Method: {manifest.get('method', 'not recorded')}. Contribution estimator: {manifest.get('estimator', 'not recorded')}.",
    ]
    contrib = manifest.get("contributions")
    if contrib is not None and len(contrib) == L:
        lines += ["", "| layer | contribution | removed |", "|---:|---:|:---:|"]
        removed = set(manifest["removed_layers"])
        lines += [f"| {i} | {_fmt(c)} | {'yes' if i in removed else ''} |" for i, c in enumerate(contrib)]
    lines += ["", "## Perplexity", ""]
    ppl = manifest.get("perplexities") or {}
    if ppl:
        lines += ["| split | before | after |", "|---|---:|---:|"]
        lines += [f"| {s} | {_fmt(v.get('before'))} | {_fmt(v.get('after'))} |" for s, v in ppl.items()]
    ver = manifest.get("verification")
    if ver:
        lines += ["", f"Reload check in a fresh process: {'passed' if ver['ok'] else 'FAILED'}; perplexity "
                  f"{_fmt(ver['ppl_reloaded'])} on the check windows (in memory {_fmt(ver['ppl_in_memory'])}), "
                  "KV-cache generation matches a cache-free pass."]  # fmt: skip
    if not ppl and not ver:
        lines.append("Not measured.")
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        f"Full record: `{MANIFEST}`.",
        "",
    ]
    return "\n".join(front + lines)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def prune_model(
    lm,
    removed: Iterable[int],
    out_dir: str | Path,
    manifest_extra: dict | None = None,
    overwrite: bool = False,
    verify: bool = True,
    verify_windows: torch.Tensor | None = None,
    expected_ppl: float | None = None,
    rtol: float = 1e-4,
) -> ExportResult:
    """Export `lm` without the `removed` layers to `out_dir` (see the module docstring)."""
    extra = dict(manifest_extra or {})
    clash = sorted(set(extra) & set(RESERVED_KEYS))
    if clash:
        raise ValueError(f"manifest_extra may not set {clash}; prune_model writes them")
    if verify and verify_windows is None:
        raise ExportError("verification needs token windows (verify_windows); pass them or disable verification.")
    model, adapter = lm.model, lm.adapter
    L = len(adapter.layers(model))
    kept, rem = _kept_from_removed(removed, L)
    out_dir = Path(out_dir)
    foreign = _prepare_folder(out_dir, overwrite)

    was_training = model.training
    model.eval()
    ppl_in_memory = None
    try:
        with pruned_view(model, adapter, kept) as (updates, unhandled, n_renumbered):
            model.save_pretrained(out_dir)
            if verify:
                ppl_in_memory = _verify_export.perplexity(model, verify_windows)
    finally:
        model.train(was_training)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(out_dir)

    manifest = {
        "format": "layerprune-manifest/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": _base_model(lm),
        "model_identity": getattr(lm, "identity", None),
        "family": getattr(lm, "family", None) or getattr(adapter, "family", None),
        "model_type": getattr(model.config, "model_type", None),
        "architecture": type(model).__name__,
        "n_layers_original": L,
        "n_layers": len(kept),
        "kept_layers": list(kept),
        "removed_layers": list(rem),
        "mask": "".join("1" if i in set(kept) else "0" for i in range(L)),
        "config_changes": {k: {"before": b, "after": a} for k, (b, a) in updates.items()},
        "unhandled_per_layer_fields": unhandled,
        "renumbered_attributes": n_renumbered,
        "versions": package_versions(),
        "verification": None,
    }
    manifest = {**{k: v for k, v in extra.items()}, **manifest}
    files = sorted({p.name for p in out_dir.iterdir()} - foreign | {MANIFEST, MODEL_CARD})
    manifest["files"] = files

    def write():
        _write_json(out_dir / MANIFEST, manifest)
        (out_dir / MODEL_CARD).write_text(model_card(json.loads(json.dumps(manifest, default=_json_default))))

    write()
    result = None
    if verify:
        param = next(model.parameters())
        raw = verify_exports([(out_dir, verify_windows)], dtype=param.dtype, device=param.device)[0]
        result = judge(raw, ppl_in_memory, len(kept), expected_ppl, rtol)
        manifest["verification"] = asdict(result)
        write()
        if not result.ok:
            raise ExportError(f"the export in {out_dir} failed its reload check: " + "; ".join(result.problems))
    return ExportResult(
        out_dir=out_dir,
        kept=kept,
        removed=rem,
        n_layers_original=L,
        config_changes=manifest["config_changes"],
        files=tuple(files),
        manifest=manifest,
        verification=result,
    )


def zip_export(out_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Zip the export folder's files (flat) to `dest` (default `<out_dir>.zip` beside it); returns the path.

    A file rather than bytes, so a multi-GB export never sits in memory; the app streams it to
    its download button. Weights are stored uncompressed (they barely compress), text deflated.
    """
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST).is_file():
        raise ExportError(f"{out_dir} holds no {MANIFEST}; export a model there first.")
    dest = Path(dest) if dest is not None else out_dir.with_name(out_dir.name + ".zip")
    tmp = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(tmp, "w") as zf:
        for p in sorted(out_dir.iterdir()):
            if p.is_file():
                method = zipfile.ZIP_STORED if p.suffix in (".safetensors", ".bin") else zipfile.ZIP_DEFLATED
                zf.write(p, arcname=f"{out_dir.name}/{p.name}", compress_type=method)
    tmp.replace(dest)
    return dest
