"""Packaging: a plain `pip install .` has every import the code makes at run time; every job has a
console command; the linter CI runs is clean."""

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"pipeline", "jobs", "schemas", "tests"}


def _dist(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imports() -> dict[str, set[tuple[str, bool]]]:
    """Third-party top-level module -> {(file, imported at module level)} over pipeline/, jobs/, schemas/."""
    found: dict[str, set[tuple[str, bool]]] = {}
    for pkg in ("pipeline", "jobs", "schemas"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} - FIRST_PARTY - set(sys.stdlib_module_names):
                    found.setdefault(top, set()).add((str(f.relative_to(ROOT)), node in tree.body))
    return found


def test_every_import_is_a_declared_dependency_and_module_level_ones_are_not_extras():
    installed = importlib.metadata.packages_distributions()
    core = {_dist(r) for r in PROJECT["dependencies"]}
    extras = {_dist(r) for name, reqs in PROJECT["optional-dependencies"].items() if name != "test" for r in reqs}
    imports = _imports()
    assert {"torch", "sklearn", "zarr", "distributed"} <= set(imports)  # the scan sees the code
    for module, where in sorted(imports.items()):
        dists = {_dist(d) for d in installed.get(module, [module])}  # an extra not installed here: its module name
        assert dists & (core | extras), f"{module} (imported in {sorted(f for f, _ in where)}) is in no dependency list of pyproject.toml"
        top_level = sorted(f for f, at_top in where if at_top)
        assert not top_level or dists & core, f"{module} is imported at module level in {top_level} but is only an extra"


def _job_modules() -> set[str]:
    return {f"jobs.{p.stem}" for p in (ROOT / "jobs").glob("*.py")
            if not p.stem.startswith("_") and p.stem != "cli" and re.search(r"^def main\(", p.read_text(), re.M)}


def test_every_python_m_job_is_a_cxr_audit_command():
    assert PROJECT["scripts"] == {"cxr-audit": "jobs.cli:main"}
    assert {m for m, _ in COMMANDS.values()} == _job_modules()


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None and os.environ.get("CI") != "true",
                    reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_is_clean():
    # the same check .ci/run makes first; here so that a merge runs it with the suite
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
