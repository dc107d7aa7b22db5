"""The import graph keeps the layers the README's architecture section describes.

jobs -> pipeline -> schemas, never backwards; inside pipeline each subpackage imports only the
layers below it (its ``__init__`` docstring says which). Static (ast), so it imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# What each layer may import besides itself, ``schemas`` and the standard/third-party libraries.
ALLOWED = {
    "core": set(),
    "io": {"core"},
    "store": {"core", "io"},
    "inference": {"core", "io"},
    "sources": {"core", "io", "store"},
    "analysis": {"core", "io", "store"},
    "reporting": {"core", "io", "store", "inference", "analysis"},
    "demo": {"core", "io", "inference"},
    "config": {"core", "io", "store", "sources", "inference", "analysis"},
    # code that runs inside a worker process: never the driver (pipeline.run)
    "worker": {"core", "io", "store", "inference", "sources", "config"},
    "run": {"core", "io", "store", "inference", "sources", "analysis", "reporting", "demo", "config", "worker"},
    "top": set(),  # pipeline/__init__.py
}


def _module(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(ROOT).with_suffix("").parts
    is_init = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_init else parts), is_init


def _imports(path: Path) -> set[str]:
    name, is_init = _module(path)
    package = name if is_init else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base) + (f".{node.module}" if node.module else "")
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pipeline":
        return None
    if len(parts) == 1:
        return "top"
    return parts[1] if parts[1] in ALLOWED else None


def _sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def test_every_pipeline_module_sits_in_a_known_layer():
    stray = [str(p.relative_to(ROOT)) for p in _sources("pipeline") if _layer(_module(p)[0]) is None]
    assert not stray, f"modules outside the layers (move them into a subpackage): {stray}"


def test_pipeline_layers_import_only_downwards():
    bad = []
    for path in _sources("pipeline"):
        own = _layer(_module(path)[0])
        for imp in _imports(path):
            if imp.startswith("jobs"):
                bad.append(f"{path.relative_to(ROOT)} imports {imp} (pipeline never imports jobs)")
            target = _layer(imp)
            if target and target != own and target not in ALLOWED[own] and target != "top":
                bad.append(f"{path.relative_to(ROOT)} ({own}) imports {imp} ({target})")
    assert not bad, "layering broken:\n" + "\n".join(sorted(set(bad)))


def test_schemas_import_nothing_from_pipeline_or_jobs():
    bad = [f"{p.relative_to(ROOT)} imports {imp}" for p in _sources("schemas") for imp in _imports(p)
           if imp.split(".")[0] in ("pipeline", "jobs")]
    assert not bad, bad


def test_subpackages_say_what_they_own():
    for layer in ALLOWED:
        if layer in ("top", "demo"):
            continue
        init = ROOT / "pipeline" / layer / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "May import" in doc, f"{init} docstring must say what it owns and may import"


def test_the_report_and_the_aggregate_job_import_no_sklearn():
    """scikit-learn is imported by the probes that fit, not by importing their modules: the report and
    jobs.aggregate import them for their settings at the end of every run (~1.5 s of fixed cost)."""
    import subprocess
    import sys

    code = ("import sys, jobs.aggregate, pipeline.reporting.html, pipeline.analysis.identifiability, "
            "pipeline.analysis.cell_fits, pipeline.analysis.site_confounding; print('sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["False"]


def test_the_job_reaches_its_cluster_start_without_pandas():
    """The driver starts its local cluster before it reads any table: pandas (~0.6 s of import) is
    imported where metadata is read, so the worker's own start (torch's import) begins that much
    earlier, beside the driver's preparation (issue 8)."""
    import subprocess
    import sys

    code = ("import sys, jobs.score_dataset, pipeline.config.run_config, pipeline.run.validate, pipeline.run.lifecycle, "
            "pipeline.run.cluster, pipeline.sources.adapters, pipeline.store.bookkeeping; "
            "jobs.score_dataset.parser(); print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.split() == ["False"]
