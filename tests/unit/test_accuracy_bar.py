"""The quality bar of bench/accuracy.py evaluates each criterion of the embedded-model issue from the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("accuracy_bench", Path(__file__).parents[2] / "bench" / "accuracy.py")
assert _SPEC is not None and _SPEC.loader is not None
accuracy = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(accuracy)

PARAMS = {"zero_shot": 0, "coarse": 24, "fine": 59, "full": 1536, "linear_probe": 774, "linear_adapter": 16512}


def _row(task: str, chance: float, zs: float, lp: float, full: float) -> dict[str, object]:
    return {"task": task, "chance": chance, "zero_shot": zs, "coarse": zs, "fine": zs, "full": full,
            "linear_probe": lp, "linear_adapter": zs, "params": PARAMS}


def test_bar_met_and_missed() -> None:
    good = {"rows": [_row("shape", 1 / 6, 0.7, 0.95, 0.9), _row("position", 0.2, 0.4, 0.9, 0.8),
                     _row("texture", 0.2, 0.5, 0.9, 0.75)]}
    assert all(met for _, met, _ in accuracy.quality_bar(good))
    bad = {"rows": [_row("shape", 1 / 6, 0.5, 0.8, 0.55), _row("digit", 0.1, 0.15, 0.9, 0.3)]}
    verdict = {name: (met, detail) for name, met, detail in accuracy.quality_bar(bad)}
    assert verdict["zero-shot shape >= 0.60"][0] is False
    assert verdict["linear probe >= 0.85 on every task"] == (False, "shape 0.80")
    assert "digit" in verdict["zero-shot at least 10 points above chance on every task"][1]
    assert verdict["at least two tasks with zero-shot >= 15 points below the probe"][0] is True
    closes = [v for k, v in verdict.items() if k.startswith("digit:")]
    assert closes and closes[0][0] is False and "closes 20%" in closes[0][1]
    assert "- [ ] zero-shot shape >= 0.60: 0.500" in accuracy.markdown(bad)
