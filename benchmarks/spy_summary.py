"""Per-call time of each function, per case, from a py-spy raw (collapsed-stack) file of ``ablate_capture.py --loop``.

    py-spy record --idle -r 1000 -f raw -o spy.txt -- \\
        python benchmarks/ablate_capture.py --loop sdpa,capture_last --calls 300
    python benchmarks/spy_summary.py spy.txt --rate 1000 --calls 300 [--top 40] [--out spy.md]

Each stack is split by its ``spy_loop__<case>`` frame (the loop ``ablate_capture.py`` runs each case in), so one
sampled process gives every case. A function's *inclusive* time is the samples whose stack holds it (once per
stack), its *self* time the samples where it is the innermost frame; both in ms per call (samples / rate /
calls). With ``--idle`` the samples also cover the host waiting for the device, so a case's total is its wall
time. Functions are keyed by name and file (not line). Rows are sorted by their largest difference from the
first case (the baseline, normally ``sdpa``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

LOOP = "spy_loop__"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _key(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m["file"]
    for marker in ("site-packages/", "/vtrlab/", "/benchmarks/"):  # short, machine-independent paths
        if marker in file:
            file = (marker.strip("/") + "/" if marker != "site-packages/" else "") + file.split(marker, 1)[1]
            break
    return f"{m['func']} ({file})"


def parse(path: Path) -> tuple[list[str], dict[str, Counter], dict[str, Counter], Counter]:
    """(cases in first-seen order, case -> inclusive counts per function, case -> self counts, case -> total)."""
    cases: list[str] = []
    incl: dict[str, Counter] = defaultdict(Counter)
    own: dict[str, Counter] = defaultdict(Counter)
    total: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if f.startswith(LOOP)), None)
        if at is None:
            continue
        case = frames[at].split(" ", 1)[0][len(LOOP) :]
        if case not in total:
            cases.append(case)
        n = int(count)
        total[case] += n
        below = [_key(f) for f in frames[at + 1 :]]
        for key in set(below):
            incl[case][key] += n
        if below:
            own[case][below[-1]] += n
    return cases, incl, own, total


def table(cases, counts, total, rate: float, calls: int, top: int, what: str) -> list[str]:
    per = 1e3 / rate / calls  # ms per call per sample
    base = cases[0]
    keys = set().union(*(counts[c] for c in cases))

    def spread(k):
        return max(abs(counts[c][k] - counts[base][k]) for c in cases[1:]) if len(cases) > 1 else counts[base][k]

    rows = sorted(keys, key=spread, reverse=True)[:top]
    head = " | ".join(cases)
    lines = [f"| {what} (ms per call) | {head} |", "|---|" + "---:|" * len(cases)]
    lines.append("| **total** | " + " | ".join(f"{total[c] * per:.2f}" for c in cases) + " |")
    for k in rows:
        lines.append(f"| `{k}` | " + " | ".join(f"{counts[c][k] * per:.2f}" for c in cases) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", type=Path, help="py-spy raw output (-f raw)")
    ap.add_argument("--rate", type=float, default=1000.0, help="py-spy's -r (samples per second)")
    ap.add_argument("--calls", type=int, default=300, help="ablate_capture.py's --calls")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here (markdown)")
    args = ap.parse_args(argv)
    if not args.raw.is_file():
        ap.error(f"{args.raw}: no such file")
    if args.rate <= 0 or args.calls < 1:
        ap.error(f"need --rate > 0 and --calls >= 1 (got {args.rate}, {args.calls})")
    cases, incl, own, total = parse(args.raw)
    if not cases:
        ap.error(f"{args.raw}: no stack passes through a {LOOP}<case> frame (was it ablate_capture.py --loop?)")
    text = "\n".join(
        table(cases, incl, total, args.rate, args.calls, args.top, "inclusive")
        + [""]
        + table(cases, own, total, args.rate, args.calls, args.top, "self")
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
