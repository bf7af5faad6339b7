"""Checks of an export destination that need no model (no torch): may `--out` receive an export?

`check_export_folder` and `check_export_path` raise before any model is loaded (validate.check_run,
the export stages); engine/export.py writes the export and re-exports these names.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from engine.errors import ExportError

MANIFEST = "pruning_manifest.json"
# What save_pretrained (model + tokenizer) writes: a folder of only these and no manifest is a
# half-written export of an older version, which overwrite may replace.
_HF_SAVE_FILES = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    r"pytorch_model.*\.bin|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|vocab\.(json|txt)|"
    r"merges\.txt|added_tokens\.json|chat_template\.(jinja|json))$"
)


_SIBLING_RESERVE = len("..replaced-4194304-0123abcd")  # what _sibling adds to the folder's name


def check_export_path(out_dir: Path) -> None:
    """ExportError (exit 2) or ReadOnlyLocation (exit 5) for an --out that would fail only at the end:
    a symbolic link (the final rename would replace the link, not fill its target), a name too long
    for the temporary sibling, a file where a parent folder should be, an unwritable parent."""
    from engine.atomic import check_name_lengths, check_writable_folder, existing_ancestor

    check_name_lengths(out_dir, "--out", reserve=_SIBLING_RESERVE)  # first: stat() itself fails on such a name
    if out_dir.is_symlink():
        target = os.readlink(out_dir)
        state = "an existing folder" if out_dir.is_dir() else "a path that does not exist"
        raise ExportError(f"--out {out_dir} is a symbolic link to {target} ({state}); exports are renamed into "
                          f"place, which would replace the link. Pass the real folder ({out_dir.resolve()}) or a "
                          "new path.")
    parent = existing_ancestor(out_dir)
    if not parent.is_dir():
        raise ExportError(f"--out {out_dir}: {parent} is a file, not a folder; choose a path inside a folder.")
    check_writable_folder(parent, "--out", out_dir)


def check_export_folder(out_dir, overwrite: bool, source=None) -> list[str]:
    """Raise ExportError unless `out_dir` may receive an export; changes nothing on disk.

    Returns the file names a previous export listed (what overwrite would replace). `source`:
    the model's own folder, which is never overwritten."""
    out_dir = Path(out_dir)
    check_export_path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; choose a folder path for the export.")
    if source is not None and out_dir.exists() and Path(source).exists() and out_dir.resolve() == Path(source).resolve():
        raise ExportError(f"{out_dir} is the model's own folder; choose another folder for the export.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return []
    if not overwrite:
        raise ExportError(f"{out_dir} is not empty; choose an empty folder or pass overwrite (--overwrite) to replace a previous export.")
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        names = [p.name for p in out_dir.iterdir()]
        if (out_dir / "config.json").is_file() and all(_HF_SAVE_FILES.match(n) for n in names):
            return names  # a half-written export of an older version: model files only, no manifest
        raise ExportError(
            f"{out_dir} is not empty and holds no {MANIFEST}, so it is not a previous export; "
            "overwrite only replaces previous exports. Choose an empty or new folder."
        )
    try:
        return list(json.loads(manifest.read_text())["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{manifest} is unreadable ({e}); delete the folder yourself or choose another.") from e
