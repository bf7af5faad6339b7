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
  export of this tool (the folder holds `pruning_manifest.json`; only the files that manifest
  lists are deleted, anything else in the folder is kept) or a half-written export of an older
  version (only the files save_pretrained writes, no manifest, not the source model's folder).
  Any other non-empty folder raises ExportError.
- Atomic: everything is written into a temporary sibling `.<name>.partial-<pid>-<hex>` (marked
  by `.layerprune-partial.json`), the fresh-process check runs on it, then the model card and
  the manifest are written (the manifest last) and the folder is renamed to `out_dir`. A kill
  at any point leaves either no `out_dir` (a previous export stays until the final swap) or a
  complete, verified one; leftover temporary siblings of dead processes are removed by the next
  export to the same path, and the partial folders (with their marker) of dead exports to other
  names by the next export into the same parent folder. `--out` is checked up front
  (`check_export_path`): a symbolic link, a name too long for the temporary sibling, a file
  where a parent folder should be, an unwritable parent. The check's child process dies with its parent (PR_SET_PDEATHSIG on
  Linux, a parent-pid watchdog elsewhere). OS failures (disk full, read-only) are raised as
  engine.errors environment errors naming the path; the temporary folder is removed.
- Written: safetensors weights, config.json, generation_config.json, the tokenizer,
  `pruning_manifest.json` and a model card `README.md`.
- Verify (`verify=True`, needs `verify_windows`): a fresh Python process loads the folder with
  AutoModelForCausalLM/AutoTokenizer only (engine/_verify_export.py, run by path) and checks
  (a) perplexity on the windows equals the in-memory pruned model's (and `expected_ppl`, when
  given) to `rtol`, (b) generate() with the KV cache gives the same logits as a cache-free pass,
  (c) config layer count and layer indices are 0..k-1. Results go into ExportResult and the
  manifest; a failed check raises ExportError with the numbers (the unverified folder is kept as
  `.<name>.failed-<pid>-<hex>` beside `out_dir` for inspection, never at `out_dir`).
  The fresh process loads the export in the model's dtype on the model's device (same kernels,
  so 1e-4 holds for bf16 too) and so briefly needs memory for a second, pruned copy there.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
import dataclasses
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

import engine
from engine import _verify_export
from engine.errors import ExportCheckFailed, ExportError, ModelLoadError, from_exception
from engine.export_checks import (  # noqa: F401 (re-exported: the checks before any model is loaded)
    _HF_SAVE_FILES, _SIBLING_RESERVE, MANIFEST, check_export_folder, check_export_path)
from engine.masking import LAYER_INDEX_ATTRS, keep_only
from engine.models import unhandled_layer_fields

MODEL_CARD = "README.md"
PARTIAL_MARKER = ".layerprune-partial.json"  # inside a temporary export folder, removed before the rename
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


def _sibling(out_dir: Path, tag: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _owner_dead(folder: Path) -> bool:
    """True when the process named in a temporary folder's name is gone (same host only)."""
    m = re.search(r"\.(?:partial|replaced)-(\d+)-[0-9a-f]{8}$", folder.name)
    if not m:
        return False
    try:
        host = json.loads((folder / PARTIAL_MARKER).read_text()).get("host", socket.gethostname())
    except (OSError, ValueError, AttributeError):
        host = socket.gethostname()
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_leftovers(out_dir) -> list[Path]:
    """Remove temporary folders that dead exports to `out_dir` left beside it; returns what was removed.

    Partial folders go whole. A previous export moved aside by a swap that was killed goes back
    to `out_dir` when nothing is there; else it loses only the files its manifest lists (files a
    user put there stay, and so does the folder then)."""
    out_dir = Path(out_dir)
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for p in out_dir.parent.glob(f".{out_dir.name}.*-*-*"):
        if not p.is_dir() or p.is_symlink() or not _owner_dead(p):
            continue
        if ".partial-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
        elif not out_dir.exists():  # killed between the two renames of a swap: put the previous export back
            os.rename(p, out_dir)
        else:
            _delete_listed(p)
        removed.append(p)
    return removed + _sweep_other_partials(out_dir)


def _sweep_other_partials(out_dir: Path) -> list[Path]:
    """Partial folders of dead exports to other names in the same parent folder: only ours (the
    marker inside names the folder's pid and target), only when their writer is gone."""
    removed = []
    for p in out_dir.parent.glob(".*.partial-*-*"):
        if p.name.startswith(f".{out_dir.name}.") or not p.is_dir() or p.is_symlink() or not _owner_dead(p):
            continue
        try:
            marker = json.loads((p / PARTIAL_MARKER).read_text())
            pid = int(re.search(r"\.partial-(\d+)-[0-9a-f]{8}$", p.name).group(1))
            ours = marker.get("pid") == pid and p.name.startswith(f".{Path(marker['out']).name}.partial-")
        except (OSError, ValueError, AttributeError, TypeError):
            ours = False
        if ours:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _listed(folder: Path) -> set[str]:
    try:
        return set(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {p.name for p in folder.iterdir() if _HF_SAVE_FILES.match(p.name)}


def _delete_listed(folder: Path) -> None:
    """Delete the files a previous export listed (and its manifest, card, marker); rmdir if empty."""
    for name in _listed(folder) | {MANIFEST, MODEL_CARD, PARTIAL_MARKER}:
        f = folder / Path(name).name  # file names only: nothing outside the folder
        if f.is_file() or f.is_symlink():
            f.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass  # files a user put there: kept


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished `tmp` to `out_dir`; a previous export there is moved aside, then removed.

    Files of the previous folder that its manifest does not list move into the new one."""
    if out_dir.exists() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = _sibling(out_dir, "replaced")
    listed = _listed(out_dir)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)  # from here on the new export is in place
    except BaseException:
        os.rename(old, out_dir)
        raise
    for p in old.iterdir():
        if p.name not in listed | {MANIFEST, MODEL_CARD} and not (out_dir / p.name).exists():
            os.rename(p, out_dir / p.name)
    _delete_listed(old)


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
    work_dir: str | Path | None = None,
) -> list[dict]:
    """Run the reload check for several exports in ONE fresh process; raw result dicts, in order.

    The fresh process loads each export in `dtype` on `device`: use the in-memory model's, so
    perplexities agree to 1e-4. It holds a second copy of the (pruned) weights while it runs,
    and dies with this process (it is passed our pid). Its files go to a temporary folder
    inside `work_dir` (default: the system's), removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="verify-export-", dir=work_dir) as tmp:
        spec = []
        for n, (model_dir, windows) in enumerate(jobs):
            wpath = Path(tmp) / f"windows-{n}.pt"
            torch.save(windows.cpu().long().contiguous(), wpath)
            spec.append({"model_dir": str(Path(model_dir).resolve()), "windows": str(wpath), "new_tokens": new_tokens,
                         "dtype": str(dtype).removeprefix("torch."), "device": str(device)})  # fmt: skip
        jobs_path, results_path = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        jobs_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, str(VERIFY_SCRIPT), str(jobs_path), str(results_path), str(os.getpid())],
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
    source = getattr(getattr(lm, "spec", None), "name", None)
    check_export_folder(out_dir, overwrite, source=source)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(out_dir)
        tmp = _sibling(out_dir, "partial")
        tmp.mkdir()
        _write_json(tmp / PARTIAL_MARKER, {"pid": os.getpid(), "host": socket.gethostname(), "out": str(out_dir),
                                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except OSError as e:
        raise from_exception(e, out_dir.parent, "preparing the export folder") or e
    keep_failed = False
    try:
        result = _write_verified(lm, kept, rem, L, tmp, out_dir, extra, verify, verify_windows, expected_ppl, rtol)
        if result.verification is not None and not result.verification.ok:
            keep_failed = True
            failed = tmp.with_name(tmp.name.replace(".partial-", ".failed-"))
            os.rename(tmp, failed)
            raise ExportCheckFailed(
                f"the export for {out_dir} failed its reload check: " + "; ".join(result.verification.problems)
                + f". Nothing was written to {out_dir}; the unverified folder is kept for inspection at {failed}."
            )
        _swap_into_place(tmp, out_dir)
    except ExportError:
        raise
    except Exception as e:
        mapped = from_exception(e, out_dir, "writing the export") or _disk_full_guess(e, out_dir)
        if mapped is not None:
            raise mapped from e
        raise
    finally:
        if not keep_failed and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dataclasses.replace(result, out_dir=out_dir)


def _disk_full_guess(e: Exception, out_dir: Path):
    """Libraries (safetensors, torch.save) word ENOSPC their own way: check the free space itself."""
    try:
        free = shutil.disk_usage(out_dir.parent).free
    except OSError:
        return None
    if free < 1 << 20:
        return from_exception(OSError(28, f"No space left on device ({type(e).__name__}: {e})", str(out_dir.parent)),
                              out_dir.parent, "writing the export")
    return None


def _write_verified(lm, kept, rem, L, tmp: Path, out_dir: Path, extra: dict, verify: bool, verify_windows,
                    expected_ppl, rtol) -> ExportResult:
    """Weights + tokenizer into `tmp`, fresh-process check on `tmp`, then card, then manifest (last)."""
    model, adapter = lm.model, lm.adapter
    was_training = model.training
    model.eval()
    ppl_in_memory = None
    try:
        with pruned_view(model, adapter, kept) as (updates, unhandled, n_renumbered):
            model.save_pretrained(tmp)
            if verify:
                ppl_in_memory = _verify_export.perplexity(model, verify_windows)
    finally:
        model.train(was_training)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(tmp)

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
    files = sorted({p.name for p in tmp.iterdir()} - {PARTIAL_MARKER} | {MANIFEST, MODEL_CARD})
    manifest["files"] = files
    result = None
    if verify:
        param = next(model.parameters())
        raw = verify_exports([(tmp, verify_windows)], dtype=param.dtype, device=param.device, work_dir=tmp)[0]
        result = judge(raw, ppl_in_memory, len(kept), expected_ppl, rtol)
        manifest["verification"] = asdict(result)
    (tmp / MODEL_CARD).write_text(model_card(json.loads(json.dumps(manifest, default=_json_default))))
    _write_json(tmp / MANIFEST, manifest)  # last: a folder with a manifest is complete
    (tmp / PARTIAL_MARKER).unlink()
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
    from engine.atomic import open_atomic

    with open_atomic(dest, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:  # temp beside + rename; errors name dest
        for p in sorted(out_dir.iterdir()):
            if p.is_file():
                method = zipfile.ZIP_STORED if p.suffix in (".safetensors", ".bin") else zipfile.ZIP_DEFLATED
                zf.write(p, arcname=f"{out_dir.name}/{p.name}", compress_type=method)
    return dest
