"""Short functions (issue 24): none in pipeline/ over 80 lines. Static (ast), so it imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80  # the goal is 60; past 80 a function is split into steps (see pipeline/worker/score_shard.py)


def long_functions(root: Path, limit: int) -> list[str]:
    """'path:line name (n lines)' for every function or method under root longer than limit lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_in_pipeline_is_over_80_lines():
    too_long = long_functions(ROOT / "pipeline", MAX_LINES)
    assert not too_long, f"split these into steps: {too_long}"


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\nclass C:\n    def long(self):\n{body}\n")
    assert [line.split(":", 1)[1] for line in long_functions(tmp_path, MAX_LINES)] == [f"6 long ({MAX_LINES + 1} lines)"]
