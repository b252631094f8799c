"""The import rules of docs/architecture.md hold: the import-linter layers contract in pyproject.toml, and no import
cycle between files of src/tuneforge."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "BROKEN" not in result.stdout


def test_contracts_are_one_layering_without_exceptions():
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
    assert [c["type"] for c in contracts].count("layers") == 1
    assert not any("ignore_imports" in c for c in contracts)


def import_graph(src: Path = ROOT / "src") -> dict[str, set[str]]:
    """Module name → the tuneforge modules it imports anywhere in its file (function-level imports included)."""
    files = {}
    for path in (src / "tuneforge").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle_and_its_members():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_files():
    graph = import_graph()
    assert "tuneforge.config.schema" in graph and "tuneforge.config.stages" in graph["tuneforge.config.schema"]
    found = cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{m} -> {sorted(set(graph[m]) & set(c))}" for m in c) + ")"
                       for c in found)
    assert not found, f"import cycles between files: {detail}"


def test_config_and_cli_parser_import_no_torch():
    # `tuneforge validate` and `tuneforge --help` must be instant: no torch/transformers at import time.
    code = ("import sys, tuneforge.config, tuneforge.cli; tuneforge.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_cli_keeps_deepspeeds_accelerator_probe_off_stdout():
    """deepspeed, when installed, prints its CPU fallback on stdout as accelerate imports it (any model save): the
    CLI's setup must keep stdout clean for --json output."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed (the distributed extra) is not installed")
    from tuneforge.cli import GPU_DEVICE_NODES

    if any(os.path.exists(f"/dev/{node}") for node in GPU_DEVICE_NODES):
        pytest.skip("a GPU device node exists: deepspeed picks its accelerator itself")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    save = ("import tempfile; from transformers import LlamaConfig, LlamaForCausalLM; "
            "LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, vocab_size=64)).save_pretrained(tempfile.mkdtemp())")
    setup = "from tuneforge.cli import quiet_library_noise; quiet_library_noise(); "
    out = subprocess.run([sys.executable, "-c", setup + save], env=env, capture_output=True, text=True, check=True)
    assert "Setting accelerator" not in out.stdout
    bare = subprocess.run([sys.executable, "-c", save], env=env, capture_output=True, text=True, check=True)
    assert "Setting accelerator to CPU" in bare.stdout  # what the CLI's setup prevents
