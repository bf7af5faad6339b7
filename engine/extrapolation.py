"""Where the surrogate interpolates and where it extrapolates: labels for predictions outside the sampled region.

numpy only. The surrogate is fitted on the run's masks; their kept counts (layers kept) span a range
[lo, hi] (the full mask, known exactly, not counted). A prediction for a mask that keeps fewer than
lo or more than hi layers (the full model itself excepted: its perplexity is measured) is an
extrapolation: no evaluated mask of that size constrains it, and on held-out games the surrogate was
wrong there by factors (bench/README.md). Such predictions carry `label`'s text, "outside the sampled
region (kept lo-hi)", wherever they are shown: the CLI's JSON (`annotate`) and the app's what-if editor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Region:
    """Kept counts the run sampled (the full mask excluded): lo..hi, and the counts themselves."""

    n_layers: int
    counts: tuple[int, ...]

    @property
    def lo(self) -> int:
        return min(self.counts)

    @property
    def hi(self) -> int:
        return max(self.counts)

    def text(self) -> str:
        return f"kept {self.lo}-{self.hi}" if self.lo != self.hi else f"kept {self.lo}"

    def inside(self, kept: int) -> bool:
        """True for a kept count the fitted masks bracket (or L: the full model, measured)."""
        return kept == self.n_layers or self.lo <= kept <= self.hi

    def label(self, kept: int) -> str | None:
        """None inside; else 'outside the sampled region (kept lo-hi)'."""
        return None if self.inside(int(kept)) else f"outside the sampled region ({self.text()})"

    def to_dict(self) -> dict:
        return {"kept_min": self.lo, "kept_max": self.hi, "kept_counts": list(self.counts), "text": self.text()}


def region(masks: np.ndarray) -> Region | None:
    """The sampled region of bool[n, L] keep-masks (None when only the full mask, or no mask, was evaluated)."""
    m = np.atleast_2d(np.asarray(masks, dtype=bool))  # (n, L)
    L = m.shape[1]
    kept = sorted({int(k) for k in m.sum(axis=1)} - {L})
    return Region(L, tuple(kept)) if kept else None


def label(kept: int, reg: Region | None) -> str | None:
    """`Region.label`, or a label saying no mask was sampled when there is no region."""
    if reg is None:
        return "outside the sampled region (no mask sampled)"
    return reg.label(kept)


def annotate(result, reg: Region | None, n_layers: int):
    """A copy of a JSON-able result where every dict holding both `removed` (a list of layers) and
    `ppl_predicted` gains `kept` and `extrapolation` (the label, or None inside the sampled region), and
    the top level gains `sampled_region` (Region.to_dict, or None). Other values are left as they are."""

    def walk(x):
        if isinstance(x, dict):
            out = {k: walk(v) for k, v in x.items()}
            if "ppl_predicted" in x and isinstance(x.get("removed"), (list, tuple)):
                kept = n_layers - len(x["removed"])
                out["kept"] = kept
                out["extrapolation"] = label(kept, reg)
            return out
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    out = walk(result)
    if isinstance(out, dict):
        out["sampled_region"] = None if reg is None else reg.to_dict()
    return out


def labels_for(masks: np.ndarray, reg: Region | None) -> list[str | None]:
    """`label` for each keep-mask of bool[n, L]."""
    m = np.atleast_2d(np.asarray(masks, dtype=bool))
    return [label(int(k), reg) for k in m.sum(axis=1)]


def sampled_counts_text(counts: Sequence[int]) -> str:
    """'9, 10, 12, 13, 15' for display."""
    return ", ".join(str(int(c)) for c in sorted(counts))
