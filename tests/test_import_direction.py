"""Imports point one way (docs/ARCHITECTURE.md), engine never imports streamlit, and the
model-free modules (sampling, surrogate, shapley) never reach transformers."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"
MODULES = {p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__"}
MODEL_MODULES = {"models", "data", "masking", "evaluate"}  # the ones that touch transformers models


def levels_from_architecture() -> dict[str, int]:
    """Module -> level, from the first code block of docs/ARCHITECTURE.md: each `->` is one level down."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.sub(r"\(.*?\)", "", text.split("```")[1])  # drop notes such as "(python -m engine)"
    levels = {}
    for level, segment in enumerate(block.split("->")):
        for word in re.findall(r"[A-Za-z_]\w*", segment):
            if (ENGINE / f"{word}.py").is_file():
                levels.setdefault(word, level)
    return levels


def engine_imports(module: str) -> tuple[set[str], set[str]]:
    """(engine modules imported, top-level external packages imported), anywhere in the file."""
    tree = ast.parse((ENGINE / f"{module}.py").read_text())
    internal, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "engine":
                    if len(parts) > 1:
                        internal.add(parts[1])
                else:
                    external.add(parts[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "engine":
                if len(parts) > 1:
                    internal.add(parts[1])
                else:  # from engine import x: x may be a module
                    internal |= {a.name for a in node.names if a.name in MODULES}
            else:
                external.add(parts[0])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"engine/{module}.py uses a relative import; write `from engine.x import ...`")
    return internal & MODULES, external


GRAPH = {m: engine_imports(m) for m in MODULES}
LEVELS = levels_from_architecture()


def reachable(module: str, through_helpers_only: bool) -> set[str]:
    """Engine modules reachable from `module`; with through_helpers_only, stop at listed modules."""
    seen, stack = set(), list(GRAPH[module][0])
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if not (through_helpers_only and m in LEVELS):
            stack.extend(GRAPH[m][0])
    return seen


def test_architecture_lists_the_core_modules():
    for m in ("config", "errors", "sampling", "store", "pipeline", "cli"):
        assert m in LEVELS, f"{m} missing from the layering diagram in docs/ARCHITECTURE.md"
    assert LEVELS["config"] < LEVELS["sampling"] < LEVELS["pipeline"] < LEVELS["cli"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m in LEVELS))
def test_imports_point_down_the_layering(module):
    # Unlisted helpers (hub, _verify_export, ...) are transparent: what they import counts
    # as imported by whoever imports them.
    for target in reachable(module, through_helpers_only=True):
        if target in LEVELS:
            assert LEVELS[target] < LEVELS[module], (
                f"engine/{module}.py (level {LEVELS[module]}) imports {target} (level {LEVELS[target]}): "
                "imports must point down the order in docs/ARCHITECTURE.md"
            )


def test_no_import_cycles():
    for m in MODULES:
        assert m not in reachable(m, through_helpers_only=False), f"import cycle through engine/{m}.py"


def test_engine_never_imports_streamlit():
    for m, (_, external) in GRAPH.items():
        assert "streamlit" not in external, f"engine/{m}.py imports streamlit"


@pytest.mark.parametrize("module", ["sampling", "surrogate", "shapley"])
def test_model_free_modules_never_reach_transformers(module):
    if module not in MODULES:
        pytest.skip(f"engine/{module}.py not written yet")
    closure = reachable(module, through_helpers_only=False) | {module}
    assert not closure & MODEL_MODULES, f"{module} reaches {closure & MODEL_MODULES}"
    for m in closure:
        assert "transformers" not in GRAPH[m][1], f"engine/{m}.py (reached from {module}) imports transformers"


def test_sampling_is_numpy_only_at_runtime():
    code = (
        "import sys, engine.sampling, engine.store;"
        "bad = {'torch', 'transformers', 'streamlit'} & set(sys.modules);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
