"""Capture's ratios to a plain sdpa forward across device calls, one column per capture.json (markdown).

    python benchmarks/compare_runs.py s5=benchmarks/results/h200/2026-12-01-s5/capture.json \
        "s6 call 1=benchmarks/results/h200/2026-12-01-s6/first_call/capture.json" \
        "s6 call 2=benchmarks/results/h200/2026-12-01-s6/capture.json"

Each cell is the median of the per-round ratios (capture.measure_interleaved); the last line gives each
call's plain forward, since a slower host makes the same host-side work a larger share of it.
"""

from __future__ import annotations

import json
import sys


def load(path: str) -> dict:
    out = {}
    for row in json.load(open(path))["shapes"]:
        base = row["results"].get("sdpa", {}).get("median_s")
        for method, res in row["results"].items():
            if "ratio_median" in res:
                out[(row["shape"], row["batch"], method)] = (res["ratio_median"], base)
    return out


def table(runs: list[tuple[str, str]]) -> str:
    data = [(name, load(path)) for name, path in runs]
    keys = list(dict.fromkeys(k for _, d in data for k in d if k[2].startswith("capture")))  # every call's cases
    lines = ["| shape | batch | case | " + " | ".join(n for n, _ in data) + " |"]
    lines.append("|---|---:|---|" + "---:|" * len(data))
    for k in keys:
        cells = ["—" if d.get(k) is None else f"{d[k][0]:.2f}" for _, d in data]  # —: not measured in that call
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    forwards = []
    for name, d in data:
        parts = [
            f"{s} b{b} {1000 * d[(s, b, m)][1]:.1f}" for (s, b, m) in keys if m == "capture_last" and (s, b, m) in d
        ]
        forwards.append(f"{name}: " + ", ".join(parts))
    lines += ["", "Plain sdpa forward (ms): " + "; ".join(forwards) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs = []
    for arg in args:
        name, sep, path = arg.partition("=")
        if not sep:
            raise SystemExit(f"{arg!r}: give NAME=PATH/capture.json")
        runs.append((name, path))
    if not runs:
        raise SystemExit("give at least one NAME=PATH/capture.json")
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
