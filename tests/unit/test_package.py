from __future__ import annotations

import subprocess
import sys

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
