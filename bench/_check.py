"""The verdict every benchmark in bench/ ends with: a ratio against a named baseline measured in
the same run, compared with the benchmark's recorded target (higher is better), printed for people
and as one machine-readable line that bench/run_all.py (scripts/bench.sh) collects:

    BENCH_RESULT {"benchmark": "...", "baseline": "...", "metric": "...", "ratio": 1.23, "target": 1.1, "pass": true}

The exit status of a benchmark is `verdict(...)`'s return: 0 when the ratio meets the target, 1 when not.
"""

from __future__ import annotations

import json
import math
import sys

PREFIX = "BENCH_RESULT "


def verdict(benchmark: str, baseline: str, metric: str, ratio: float, target: float) -> int:
    """Print the verdict line(s); return the exit status (0 pass, 1 below target or not a number)."""
    ok = math.isfinite(ratio) and ratio >= target
    print(f"{benchmark}: {metric} = {ratio:.3f} (baseline: {baseline}); target >= {target:g}: "
          f"{'PASS' if ok else 'FAIL'}", flush=True)
    print(PREFIX + json.dumps({"benchmark": benchmark, "baseline": baseline, "metric": metric,
                               "ratio": round(ratio, 4) if math.isfinite(ratio) else None,
                               "target": target, "pass": ok}), flush=True)
    if not ok:
        print(f"FAIL: {benchmark}: {metric} {ratio:.3f} < target {target:g}", file=sys.stderr, flush=True)
    return 0 if ok else 1
