"""engine.extrapolation: predictions outside the run's sampled kept counts carry a label (CLI JSON, what-if editor)."""

from __future__ import annotations

import numpy as np

from engine import extrapolation as ex
from engine import views
from engine.config import SamplingSpec
from engine.decision import removal_mask
from engine.sampling import sample_masks


def test_region_of_the_paper_strata_and_its_labels():
    masks = sample_masks(SamplingSpec(n_masks=64, seed=0), 16)  # strata 15, 13, 12, 10, 9
    reg = ex.region(np.vstack([masks, np.ones((1, 16), bool)]))  # the full mask does not widen it
    assert (reg.lo, reg.hi, reg.counts) == (9, 15, (9, 10, 12, 13, 15))
    assert reg.label(11) is None and reg.label(9) is None and reg.label(16) is None  # 16: the full model
    assert reg.label(8) == "outside the sampled region (kept 9-15)"
    assert reg.label(0) == "outside the sampled region (kept 9-15)"
    assert ex.labels_for(np.stack([removal_mask((0,), 16), removal_mask(tuple(range(15)), 16)]), reg) == [
        None, "outside the sampled region (kept 9-15)"]
    assert ex.region(np.ones((1, 4), bool)) is None and "no mask sampled" in ex.label(3, None)


def test_annotate_labels_every_prediction_next_to_a_removed_set():
    reg = ex.Region(16, (9, 10, 12, 13, 15))
    result = {"run_id": "r", "removed": [0, 1], "ppl_predicted": 20.0,
              "by_k": [{"k": 4, "removed": [1, 2, 3, 4], "ppl_predicted": 21.0},
                       {"k": 10, "removed": list(range(10)), "ppl_predicted": 900.0}],
              "candidates": [{"sets": [{"removed": list(range(15)), "ppl_predicted": 25594.9}]}],
              "other": {"removed": [1]}}  # no prediction: untouched
    out = ex.annotate(result, reg, 16)
    assert out["extrapolation"] is None and out["kept"] == 14
    assert [b["extrapolation"] for b in out["by_k"]] == [None, "outside the sampled region (kept 9-15)"]
    assert out["candidates"][0]["sets"][0]["kept"] == 1
    assert out["candidates"][0]["sets"][0]["extrapolation"] == "outside the sampled region (kept 9-15)"
    assert "extrapolation" not in out["other"] and "extrapolation" not in result  # a copy
    assert out["sampled_region"] == {"kept_min": 9, "kept_max": 15, "kept_counts": [9, 10, 12, 13, 15],
                                     "text": "kept 9-15"}


def test_the_what_if_editor_label():
    masks = sample_masks(SamplingSpec(n_masks=64, seed=0), 16)
    assert views.extrapolation_label(masks, removal_mask((3, 4), 16)) is None
    assert views.extrapolation_label(masks, removal_mask(tuple(range(16)), 16)) == \
        "outside the sampled region (kept 9-15)"
