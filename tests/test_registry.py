"""engine.registry: one wording for unknown names, no silent overwrite, lazy entries, and every registry uses it."""

import pytest

from engine.errors import EstimationError, WorkbenchError
from engine.registry import Registry


def test_unknown_name_has_one_wording_and_the_registry_error_type():
    r = Registry("thing", {"a": 1, "b": 2}, error=EstimationError)
    assert r.lookup("a") == 1 and list(r) == ["a", "b"] and r.get("zz") is None
    with pytest.raises(EstimationError, match=r"^unknown thing 'x'; choose from a, b$"):
        r.lookup("x")


def test_a_second_entry_under_one_name_is_refused():
    r = Registry("thing", {"a": 1})
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a", 2)
    assert r["a"] == 1


def test_lazy_entries_import_on_first_lookup():
    r = Registry("thing")
    r.register_lazy("join", "os.path:join")
    import os.path

    assert r.lookup("join") is os.path.join


@pytest.mark.parametrize("path", ["engine.estimators:ESTIMATORS", "engine.surrogate:SURROGATES",
                                  "engine.baselines:BASELINES", "engine.models:ADAPTERS",
                                  "engine.interactions:INDICES", "engine.terminal:SUMMARIES", "engine.cli:_COMMANDS"])
def test_every_registry_is_a_registry(path):
    import importlib

    module, _, name = path.partition(":")
    r = getattr(importlib.import_module(module), name)
    assert isinstance(r, Registry) and len(r) > 0
    with pytest.raises(WorkbenchError, match=f"^unknown {r.kind} 'no-such'; choose from "):
        r.lookup("no-such")
