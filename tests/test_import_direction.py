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
# A package (engine/pipeline/) counts as one module: its files' imports are the package's.
MODULES = {p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__"} | {
    p.parent.name for p in ENGINE.glob("*/__init__.py")}


def module_files(module: str) -> list[Path]:
    """The source files of an engine module: engine/<module>.py, or every file of the package engine/<module>/."""
    single = ENGINE / f"{module}.py"
    return [single] if single.is_file() else sorted((ENGINE / module).glob("*.py"))
MODEL_MODULES = {"models", "data", "masking", "evaluate"}  # the ones that touch transformers models


def levels_from_architecture() -> dict[str, int]:
    """Module -> level, from the first code block of docs/ARCHITECTURE.md: each `->` is one level down."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.sub(r"\(.*?\)", "", text.split("```")[1])  # drop notes such as "(python -m engine)"
    levels = {}
    for level, segment in enumerate(block.split("->")):
        for word in re.findall(r"[A-Za-z_]\w*", segment):
            if (ENGINE / f"{word}.py").is_file() or (ENGINE / word / "__init__.py").is_file():
                levels.setdefault(word, level)
    return levels


def engine_imports(module: str) -> tuple[set[str], set[str]]:
    """(engine modules imported, top-level external packages imported), anywhere in the file (in any file
    of a package; a package's imports of its own files are not counted)."""
    internal, external = set(), set()
    nodes = [n for path in module_files(module) for n in ast.walk(ast.parse(path.read_text()))]
    for node in nodes:
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
    return (internal & MODULES) - {module}, external


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


@pytest.mark.parametrize("module", ["sampling", "surrogate", "shapley", "interactions", "interaction_intervals",
                                    "mask_order", "store_schema"])
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


def _file_imports(path: Path) -> set[str]:
    """Every `engine.<module>` a file imports (anywhere in it), and top-level packages as `pkg`."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name if a.name.startswith("engine.") else a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "engine":
                out |= {f"engine.{a.name}" for a in node.names}
            else:
                out.add(node.module if node.module.startswith("engine.") else node.module.split(".")[0])
    return out


# What the app may use from the engine: the orchestrator, the page helpers, the specs and the
# registries' names. Model logic (method, evaluate, masking, models, data, surrogate fitting) is
# reached through engine.pipeline only.
PAGE_ALLOWED = {"engine.pipeline", "engine.views", "engine.config", "engine.errors", "engine.estimators",
                "engine.surrogate", "engine.baselines", "engine.store", "engine.decision", "engine.export",
                "engine.jobs", "engine.html_report", "engine.session"}
PAGE_FORBIDDEN = {"engine.method", "engine.evaluate", "engine.masking", "engine.models", "engine.data",
                  "engine.shapley", "torch", "transformers"}


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "pages").glob("*.py")) + ["app.py"])
def test_pages_reach_the_engine_through_the_pipeline_only(page):
    path = ROOT / "pages" / page if page != "app.py" else ROOT / page
    used = {m for m in _file_imports(path) if m.startswith("engine.") or m in PAGE_FORBIDDEN}
    assert not used & PAGE_FORBIDDEN, f"{page} imports {used & PAGE_FORBIDDEN}: call engine.pipeline instead"
    assert used <= PAGE_ALLOWED, f"{page} imports {used - PAGE_ALLOWED}"


def test_views_hold_no_model_logic_and_no_streamlit():
    used = _file_imports(ENGINE / "views.py")
    assert not used & (PAGE_FORBIDDEN | {"streamlit", "engine.pipeline", "engine.cli"}), used


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_benchmarks_never_import_the_app(script):
    used = _file_imports(ROOT / "bench" / script)
    assert not used & {"streamlit", "pages", "app"}, f"bench/{script} imports the app"


def test_help_and_status_import_no_torch_sklearn_or_scipy(tmp_path):
    code = (
        "import sys; from engine import cli;"
        "rc = [cli.main(['status', '--cache-dir', sys.argv[1]])];"
        "bad = {'torch', 'sklearn', 'scipy', 'transformers'} & set(sys.modules);"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)},
                   capture_output=True)
    code = "import sys; from engine import cli; cli.build_parser(['--help']).format_help();" \
           "assert not {'torch', 'sklearn', 'scipy'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
