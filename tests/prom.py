"""Reading Prometheus text expositions in tests: the sum of a metric's samples whose labels include the given ones
(so a metric labelled by model reads the same as before when one model serves)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["sample_sum"]


def sample_sum(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples named ``name`` (``labels``: 'k="v",k2="v2"', each must match); 0 when absent."""
    want = dict(part.split("=", 1) for part in labels.split(",") if part) if labels else {}
    want = {k.strip(): v.strip().strip('"') for k, v in want.items()}
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                total += sample.value
    return total
