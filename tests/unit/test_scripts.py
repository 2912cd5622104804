"""The shell scripts of the quick start: setup runs pip only when .venv is missing or stale (issue 23.3)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _fake_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of what setup.sh reads, with a .venv whose python and pip only log their arguments."""
    tree = tmp_path / "repo"
    (tree / "scripts").mkdir(parents=True)
    (tree / "clients/python").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/setup.sh", tree / "scripts/setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    shutil.copy(ROOT / "clients/python/pyproject.toml", tree / "clients/python/pyproject.toml")
    log = tmp_path / "calls.log"
    (tree / ".venv/bin").mkdir(parents=True)
    for tool in ("python", "pip"):
        exe = tree / ".venv/bin" / tool
        exe.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return tree, log


def _setup(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=tree, capture_output=True, text=True, check=True)


def _installs(log: Path) -> list[str]:
    return [c for c in (log.read_text().splitlines() if log.exists() else []) if " install " in f" {c} "]


def test_setup_installs_once_then_only_when_the_project_changes(tmp_path: Path) -> None:
    tree, log = _fake_tree(tmp_path)
    _setup(tree)
    first = _installs(log)
    assert any("-e .[service,dev]" in c for c in first), first
    assert (tree / ".venv/.residual-setup").is_file()
    log.unlink()
    again = _setup(tree)
    assert _installs(log) == [] and again.stderr == ""  # nothing to do: no pip, no output
    with open(tree / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency would change this file\n")
    _setup(tree)
    assert any("-e .[service,dev]" in c for c in _installs(log))


def test_serving_never_installs_a_browser() -> None:
    """Chromium is for the browser tests: test.sh and CI install it, serve.sh (through setup.sh) never does."""
    assert "chromium" not in (ROOT / "scripts/setup.sh").read_text().lower()
    assert "chromium" not in (ROOT / "scripts/serve.sh").read_text().lower()
    assert "ensure-chromium.sh" in (ROOT / "scripts/test.sh").read_text()
