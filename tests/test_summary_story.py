"""engine.html_report's headline sentence, speed warning and default prompt (pure functions over a record)."""

from engine import html_report


def _record(busy=False, held=True):
    ppl = {"calibration": {"before": 50.0, "after": 57.0, "ratio": 1.14, "ratio_low": 1.10, "ratio_high": 1.19,
                           "level": 0.9, "n_windows": 8}}
    if held:
        ppl["demo-test"] = {"before": 40.0, "after": 46.0, "ratio": 1.15, "ratio_low": 1.12, "ratio_high": 1.18,
                            "level": 0.9, "n_windows": 8}
    fp = {"n_layers": 16, "n_params": 100_000_000, "weight_mib": 381.0, "forward_ms": 100.0, "tokens_per_s": 20.0,
          "repeats": 3}
    return {"n_layers": 16, "removed": [2, 3, 7, 10], "ppl": ppl,
            "footprint": {"full": fp, "pruned": {**fp, "n_layers": 12, "n_params": 78_000_000}},
            "speed": {"forward_speedup": 1.31, "forward_low": 1.2, "forward_high": 1.4, "generation_speedup": 1.2,
                      "generation_low": 1.1, "generation_high": 1.3, "repeats": 5, "load_average": 3.0 if busy else 0.1,
                      "cores": 2, "full_spread": 0.05, "busy": busy}}


def test_story_states_share_interval_and_spread():
    text = html_report.story(_record())
    assert text.startswith("Removing 4 of 16 layers (25%) keeps 78% of the parameters")
    assert "held-out perplexity (demo-test, 8 windows) by +15% [90% interval +12% to +18%]" in text
    assert "1.31x as fast" in text and "1.20-1.40x over 5 interleaved repeats" in text
    assert "calibration perplexity (calibration, 8 windows) by +14%" in html_report.story(_record(held=False))
    two = _record()
    two["ppl"] = {"calibration": two["ppl"]["calibration"], "demo-ood": {**two["ppl"]["demo-test"], "ratio": 1.5},
                  "demo-test": two["ppl"]["demo-test"]}  # stored sorted by name; asked for demo-test first
    assert "(demo-test, 8 windows) by +15%" in html_report.story({**two, "splits_order": ["demo-test", "demo-ood"]})


def test_speed_warning_only_on_a_busy_machine():
    assert html_report.speed_warning(_record()) is None
    assert "load average 3.0 on 2 cores" in html_report.speed_warning(_record(busy=True))


def test_rows_show_parameter_share_and_ratio_intervals():
    rows = {a: c for a, _, c in html_report.rows(_record())}
    assert rows["parameters"] == "78.00 M (78%)"
    assert rows["perplexity, demo-test"] == "46.00 (+15%, 90% interval +12% to +18%)"


def test_default_prompt_skips_markup_and_fragments():
    texts = ["0 to 64 for BLAKE2b, 0 to\n====\n.. module:: hashlib\nThe hashlib module implements a common interface "
             "to many different secure hash algorithms.\n"]
    assert html_report.default_prompt(texts) == "The hashlib module implements a common interface to"
    assert html_report.default_prompt(["just three words"]) == "just three words"
