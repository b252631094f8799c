"""CI runs the README's test command, tier by tier (fast first), and every tier's marker is registered."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _command_of(script: Path) -> str:
    lines = [line.strip() for line in script.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))][-1]


def test_readme_gives_the_command_ci_runs():
    command = _command_of(ROOT / ".ci" / "run")
    assert "./scripts/test.sh" in command
    assert command in (ROOT / "README.md").read_text()


def test_tier_markers_are_registered():
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    names = {m.split(":")[0] for m in markers}
    assert {"slow", "real", "browser"} <= names
    script = (ROOT / "scripts" / "test.sh").read_text()
    order = [script.index(f'tier {t} ') for t in ("fast", "slow", "real", "browser")]
    assert order == sorted(order)
    assert '"not slow and not real and not browser"' in script


def test_an_empty_later_tier_passes_but_a_failing_tier_fails(tmp_path):
    """pytest exits 5 when a tier selects nothing: fine for slow/real/browser, not for a failure."""
    fake = tmp_path / "repo"
    (fake / "scripts").mkdir(parents=True)
    (fake / ".venv" / "bin").mkdir(parents=True)
    (fake / "scripts" / "test.sh").write_text((ROOT / "scripts" / "test.sh").read_text())
    python = fake / ".venv" / "bin" / "python"  # a stand-in pytest: exit code per tier from the environment
    python.write_text('#!/bin/sh\n'
                      'case "$*" in *"not slow"*) exit ${FAST:-0};; *" slow"*) exit ${SLOW:-5};; esac\nexit 5\n')
    python.chmod(0o755)

    def run(**codes):
        env = {**os.environ, **{k: str(v) for k, v in codes.items()}}
        return subprocess.run(["bash", str(fake / "scripts" / "test.sh")], env=env, capture_output=True).returncode

    assert run() == 0  # later tiers empty
    assert run(FAST=1) == 1
    assert run(FAST=5) == 5  # an empty fast tier means the suite is broken
    assert run(SLOW=1) == 1
