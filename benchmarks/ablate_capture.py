"""Where capture's added wall time goes, by ablation: each step adds one part of a capture call (GPU).

    python benchmarks/ablate_capture.py --out $OUT/ablate.json                       # LLaVA-1.5-7B, batch 1
    python benchmarks/ablate_capture.py --out $OUT/ablate.json --shape llava-next-7b --batch 8
    python benchmarks/ablate_capture.py --tiny --out /tmp/ablate.json                # CPU smoke run
    py-spy record --idle -r 1000 -f raw -o $OUT/spy.txt -- \\
        python benchmarks/ablate_capture.py --loop sdpa,capture_question --calls 300   # untimed loops, for a sampler
    python benchmarks/spy_summary.py $OUT/spy.txt                                    # per call, per function

A profiler (torch.profiler) slows every dispatched operator several times, so on a host-bound forward it
cannot say how much of capture's *unprofiled* cost each part is (benchmarks/README.md, session 6). This
script measures the parts by subtraction instead, every case once per round in a shuffled order (15 rounds
after 2 warm-ups, ``capture.measure_interleaved``), each round's times divided by that round's plain forward:

  sdpa            ``model(**inputs, use_cache=False)``
  switched        the same forward with the probed modules' configs on vtrlab's attention function and an
                  empty probe session (the function's per-call dispatch, the config switch)
  held            capture's set-up and forward with every site holding its rows (``LayerGroup.add``) but no
                  group ever computing them (flushes dropped; no vision gather): set-up + per-layer record
  launched        ``vtrlab.probes.engine.launch``: the forward, the groups' flushes (stack, bmm, softmax) and
                  the asynchronous copies to the host, waited for; no labels, no Dataset
  capture         the whole ``vtrlab.capture`` call

for the three cases of ``capture.py`` (``last``, ``question``, ``last_vision``). Per case the JSON also has
``issue_s``: the host's time until the call returns, before the device is synchronised (with a host-bound
forward this is nearly the whole wall time; the difference is the GPU's tail). The increments between steps
are the cost of each part.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_bench_capture", _HERE / "capture.py")
_capture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_capture)

QUERIES = {"last": ("last", False), "question": ("question", False), "last_vision": ("last", True)}
STEPS = ("switched", "held", "launched", "capture")


@contextlib.contextmanager
def _flushes_dropped():
    """Groups forget what they hold instead of computing it; the vision gather is skipped (its rows never
    exist). Only for the ``held`` step of this benchmark."""
    from vtrlab.probes import engine, grouped

    def drop(self):
        self.pending, self._held, self._out = [], 0, 0

    saved = (grouped.LayerGroup.flush, engine._vision_probs, engine._vision_gather)
    grouped.LayerGroup.flush = drop
    engine._vision_probs = lambda vlm, sites: {}
    engine._vision_gather = lambda *a, **k: None
    try:
        yield
    finally:
        grouped.LayerGroup.flush, engine._vision_probs, engine._vision_gather = saved


@contextlib.contextmanager
def _group_out_bytes(n: int):
    """Groups of at most ``n`` bytes of probabilities (``vtrlab.probes.grouped.GROUP_MAX_OUT_BYTES``)."""
    from vtrlab.probes import grouped

    saved, grouped.GROUP_MAX_OUT_BYTES = grouped.GROUP_MAX_OUT_BYTES, n
    try:
        yield
    finally:
        grouped.GROUP_MAX_OUT_BYTES = saved


def group_cases(vlm, batch, mib: list[int]) -> dict:
    """``capture_<case>@<n>M``: the whole capture call with groups of at most n MiB of probabilities."""
    from vtrlab.probes import engine

    out = {}
    for name, (queries, vision) in QUERIES.items():
        for n in mib:

            def full(queries=queries, vision=vision, n=n):
                with _group_out_bytes(n * 2**20):
                    return engine.capture(vlm, batch, queries=queries, vision=vision)

            out[f"capture_{name}@{n}M"] = full
    return out


def cases(vlm, batch) -> dict:
    """name -> zero-argument function, for every step of every query case and the plain forward."""
    from vtrlab.probes import engine
    from vtrlab.probes.attention import session
    from vtrlab.probes.switch import attention_switched

    inputs = dict(batch.inputs)
    lm, vis = engine.attention_modules(vlm, vision=False), engine.attention_modules(vlm, vision=True)

    def sdpa():
        with torch.no_grad():
            return vlm.model(**inputs, use_cache=False).logits

    out = {"sdpa": sdpa}
    for name, (queries, vision) in QUERIES.items():
        probed = lm + (vis if vision else [])

        def switched(probed=probed):
            with attention_switched(vlm.model, probed), session({}), torch.no_grad():
                return vlm.model(**inputs, use_cache=False).logits

        def held(queries=queries, vision=vision):
            with _flushes_dropped():
                return engine.launch(vlm, batch, queries=queries, vision=vision)

        def launched(queries=queries, vision=vision):
            return engine.launch(vlm, batch, queries=queries, vision=vision)  # the builder: not called

        def full(queries=queries, vision=vision):
            return engine.capture(vlm, batch, queries=queries, vision=vision)

        out.update({f"{step}_{name}": fn for step, fn in zip(STEPS, (switched, held, launched, full))})
    return out


def measure(fns: dict, device, warmup: int, rounds: int, seed: int = 0) -> dict:
    """``capture.measure_interleaved`` (exactly ``rounds`` rounds), with each step's added time beside the ratios:
    ``added_ms`` (median of the per-round differences to the plain forward) and ``added_min_ms`` (fastest call
    against fastest call, the least disturbed figure on a noisy host)."""
    res = _capture.measure_interleaved(fns, device, warmup, rounds, seed=seed)
    base = res["sdpa"]["times_s"]
    for name, r in res.items():
        if "times_s" not in r:  # out of memory: {"error": ...}
            continue
        r["min_s"] = min(r["times_s"])
        if name != "sdpa":
            r["added_ms"] = 1e3 * statistics.median([t - b for t, b in zip(r["times_s"], base)])
            r["added_min_ms"] = 1e3 * (r["min_s"] - min(base))
    return res


def markdown(report: dict) -> str:
    lines = [
        f"Device: {report['device']}; torch {report['torch']}, transformers {report['transformers']}; "
        f"{report['shape']} batch {report['batch']} ({report['n_tokens']} tokens); {report['rounds']} interleaved "
        f"rounds after {report['warmup']} warm-up. Plain forward {1e3 * report['results']['sdpa']['median_s']:.1f} ms "
        f"(host issue {1e3 * report['results']['sdpa']['issue_median_s']:.1f} ms).",
        "",
        "| case | step | × sdpa | IQR | added ms (median of per-round differences) | step's own ms | "
        "added ms (fastest call vs fastest plain forward) | host issue ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    res = report["results"]
    fastest = min(res["sdpa"]["times_s"])
    for r in res.values():  # JSONs written before the field existed
        if "times_s" in r:
            r.setdefault("added_min_ms", 1e3 * (min(r["times_s"]) - fastest))
    for name in QUERIES:
        prev = 0.0
        for step in STEPS:
            r = res.get(f"{step}_{name}")
            if r is None or "error" in r:
                if r is not None:
                    lines.append(f"| {name} | {step} | — | — | {r['error'][:60]} | — | — | — |")
                continue
            lines.append(
                f"| {name} | {step} | {r['ratio_median']:.3f} | {r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} | "
                f"{r['added_ms']:.2f} | {r['added_ms'] - prev:+.2f} | {r['added_min_ms']:.2f} | "
                f"{1e3 * r['issue_median_s']:.1f} |"
            )
            prev = r["added_ms"]
    variants = sorted(k for k in res if "@" in k)
    if variants:
        lines += [
            "",
            "| case, groups of at most | × sdpa | IQR | added ms | added ms (fastest) |",
            "|---|---:|---:|---:|---:|",
        ]
        for k in variants:
            r = res[k]
            lines.append(
                f"| {k} | {r['ratio_median']:.3f} | {r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} | "
                f"{r['added_ms']:.2f} | {r['added_min_ms']:.2f} |"
            )
    return "\n".join(lines)


SPY_PREFIX = "spy_loop__"


def spy_loop(case: str):
    """A loop function named after ``case`` (``spy_loop__<case>``), so that a sampling profiler's stacks say
    which case each sample belongs to (``spy_summary.py`` splits them by that frame)."""
    ns: dict = {}
    exec(  # noqa: S102 - a fixed template; the name is a case name of this script
        f"def {SPY_PREFIX}{case}(fn, calls, sync):\n    for _ in range(calls):\n        fn()\n        sync()\n", ns
    )
    return ns[f"{SPY_PREFIX}{case}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _capture.add_one_shape_args(ap)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated cases to run (default: every step of every case)")
    ap.add_argument(
        "--loop", default=None, help="comma-separated cases to run --calls times each, untimed (for py-spy)"
    )
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument(
        "--group-out-mib",
        default=None,
        help="comma-separated group caps in MiB: also time capture_<case>@<n>M (GROUP_MAX_OUT_BYTES = n MiB)",
    )
    args = ap.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error(f"need --batch >= 1, --repeats >= 1, --warmup >= 0 (got {args.batch}, {args.repeats}, {args.warmup})")
    name, vlm, batch = _capture.one_shape(ap, args)
    bs = args.batch
    fns = cases(vlm, batch)
    if args.loop is not None:
        unknown = [c for c in args.loop.split(",") if c not in fns]
        if unknown:
            ap.error(f"--loop: unknown case(s) {unknown}; choose from {list(fns)}")
        for case in args.loop.split(","):
            spy_loop(case)(fns[case], args.calls, lambda: _capture._sync(vlm.device))
        return 0
    if args.only:
        wanted = ["sdpa"] + [c for c in args.only.split(",") if c != "sdpa"]
        unknown = [c for c in wanted if c not in fns]
        if unknown:
            ap.error(f"--only: unknown case(s) {unknown}; choose from {list(fns)}")
        fns = {c: fns[c] for c in wanted}
    if args.group_out_mib:
        try:
            mib = [int(x) for x in args.group_out_mib.split(",")]
        except ValueError:
            ap.error(f"--group-out-mib={args.group_out_mib!r}: need comma-separated positive integers, e.g. 8,16,64")
        if min(mib) < 1:
            ap.error(f"--group-out-mib={args.group_out_mib!r}: need comma-separated positive integers, e.g. 8,16,64")
        fns.update(group_cases(vlm, batch, mib))
    import transformers

    report = {
        "device": torch.cuda.get_device_name() if vlm.device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": name,
        "batch": bs,
        "n_tokens": int(batch.inputs["input_ids"].shape[1]),
        "rounds": args.repeats,
        "warmup": args.warmup,
        "host": _capture.host_info(),
        "results": measure(fns, vlm.device, args.warmup, args.repeats),
    }
    print(markdown(report), flush=True)
    _capture.write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
