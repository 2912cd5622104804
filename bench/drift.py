"""What the drift statistics cost: /classify throughput with RESIDUAL_DRIFT=on against off, side by side.

Two API processes serve the same model on one machine, one with drift statistics on and one with them off, loaded in
alternation, then a second pair started in the other order (``bench/_ab.py``; ``--control`` runs both with drift off
and shows the noise of the comparison itself). The ratio is on / off of the median images/s over both pairs. The
drift answer of the last 'on' process shows what was counted (``n_images``) and ``skipped`` images (the drift thread
fell behind and sampled). Throughput ratios on a shared 2-core machine carry a few percent of noise per process, so
the run also reports the cost directly: ``drift_cpu_share``, the drift thread's CPU time over the whole process's
CPU time (``residual_drift_cpu_seconds_total`` against /proc), an upper bound of the throughput it can take.

    python bench/drift.py --json bench/out/drift.json
    python bench/drift.py --smoke
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from _ab import Servers, arguments, compare, images, summary  # type: ignore[import-not-found]


def _metric(url: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in httpx.get(url + "/metrics").text.splitlines()
               if line.startswith(name + "{"))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__, "drift")
    args = p.parse_args(argv)
    if args.smoke:
        args.seconds, args.rounds, args.clients = 2.0, 1, 4
    pool = images(257)  # the training mixture, drawn afresh (in distribution); odd: every image gets sampled
    report: dict[str, Any] = {}
    totals = {"skipped": 0.0, "drift_cpu": 0.0, "process_cpu": 0.0}

    def after_pair(servers: Servers) -> None:
        nonlocal report
        proc, url = servers["on"]
        answer = httpx.get(url + "/drift", params={"describe": 0, "window": "all"}, timeout=60)
        if answer.status_code == 200:
            report = answer.json()
        totals["skipped"] += _metric(url, "residual_drift_skipped_images_total")
        totals["drift_cpu"] += _metric(url, "residual_drift_cpu_seconds_total")
        totals["process_cpu"] += _cpu_s(proc.pid)

    configs = {mode: {"RESIDUAL_DRIFT": "off" if args.control else mode} for mode in ("on", "off")}
    rates = compare(configs, pool, args.clients, args.images, args.seconds, args.rounds, after_pair)
    skipped, drift_cpu, process_cpu = totals["skipped"], totals["drift_cpu"], totals["process_cpu"]
    summary(args, rates, drift_images_counted=report.get("n_images"), drift_images_skipped=int(skipped),
            drift_score=report.get("score"),
            drift_cpu_share=round(drift_cpu / process_cpu, 4) if process_cpu else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
