"""The training package stays readable: no function in src/tuneforge/train/ longer than 80 lines (aim: 60), and
the front door sits above per-task runs (no import cycle between train/per_task.py and the run)."""

from __future__ import annotations

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[1] / "src" / "tuneforge" / "train"
LIMIT = 80


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_in_train_is_longer_than_the_limit():
    too_long = [f"{path.relative_to(TRAIN.parent)}:{line} {name} ({length} lines)"
                for path in sorted(TRAIN.rglob("*.py")) for name, line, length in _functions(path) if length > LIMIT]
    assert not too_long, "split these functions:\n" + "\n".join(too_long)


def test_the_limit_check_sees_a_long_function(tmp_path):
    path = tmp_path / "long.py"
    path.write_text("def f():\n" + "    x = 1\n" * LIMIT)
    assert [length for *_, length in _functions(path)] == [LIMIT + 1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_per_task_runs_do_not_import_the_front_door():
    """front → per_task → phases: per_task trains its task runs through the phases, never through the front door."""
    imported = _imports(TRAIN / "per_task.py")
    assert not {name for name in imported if name.startswith(("tuneforge.train.front", "tuneforge.train.run."))}
    assert "tuneforge.train.train" not in imported
    assert "tuneforge.train.phases.run" in imported


def test_the_front_door_is_the_package_entry():
    import tuneforge.train
    from tuneforge.train.front import train

    assert tuneforge.train.train is train
