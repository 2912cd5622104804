from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_settings_table_is_generated_from_settings() -> None:
    table = subprocess.run([sys.executable, "scripts/settings_table.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.strip()
    assert table in (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().split("```")[1]
    assert "bash scripts/serve.sh" in head and "bash scripts/test.sh" in head
    assert "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()
