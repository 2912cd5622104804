from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import residual

FORBIDDEN = ("fastapi", "starlette", "redis", "rq", "prometheus_client", "pydantic_settings")


def test_library_imports_no_service_packages() -> None:
    code = ("import sys, residual, residual.cli, residual.tiny.world, residual.tiny.tasks; "
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_all_is_honest() -> None:
    public = {n for n in dir(residual) if not n.startswith("_") and not isinstance(getattr(residual, n), type(sys))}
    assert set(residual.__all__) == public
    assert residual.__all__ == sorted(residual.__all__, key=lambda s: (not s.isupper(), s))


def test_security_relevant_dependency_floors() -> None:
    """reliability.md B2/H1: versions with the fixes we rely on (weights_only loading, multipart and body limits)."""
    import os
    from importlib.metadata import version

    from packaging.version import Version

    floors = {"torch": "2.10", "pillow": "12.0", "starlette": "1.3.1", "python-multipart": "0.0.27",
              "safetensors": "0.4"}
    for package, floor in floors.items():
        assert Version(version(package)) >= Version(floor), (package, version(package), floor)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"starlette>=1.3.1"' in pyproject and '"python-multipart>=0.0.27"' in pyproject
