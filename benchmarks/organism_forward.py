"""CPU forward time of the bundled organism on a batch of 8 held-out samples (target <= 0.5 s on
2 cores), median of ``--repeats`` runs after ``--warmup`` runs; one forward = the full prompt
(256 image tokens + question) through vision tower, projector and LM, no generation.

    python benchmarks/organism_forward.py  # 2 threads, writes benchmarks/results/organism_forward.json
    python benchmarks/organism_forward.py --threads 1 --out /tmp/o.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vtrlab.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--path", default=str(ROOT / "data" / "models" / "organism"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "organism_forward.json"))
    a = p.parse_args(argv)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtrlab.data.synthetic import generate
    from vtrlab.organism.processor import user_message

    torch.set_num_threads(a.threads)
    proc = AutoProcessor.from_pretrained(a.path, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(a.path, local_files_only=True).eval()
    samples = generate(a.batch, seed=0)
    texts = [proc.apply_chat_template(user_message(s.question), add_generation_prompt=True) for s in samples]
    batch = proc(images=[s.image for s in samples], text=texts, return_tensors="pt", padding=True)
    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.repeats):
            t = time.perf_counter()
            model(**batch, use_cache=False)
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
    result = {
        "benchmark": "organism_forward",
        "batch": a.batch,
        "seq_len": int(batch["input_ids"].shape[1]),
        "threads": a.threads,
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "repeats": a.repeats,
        "warmup": a.warmup,
        "target_s": 0.5,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
        "attn_implementation": model.config._attn_implementation,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result, indent=1, sort_keys=False)
    print(
        f"forward of a batch of {a.batch} on {a.threads} threads: median {result['median_s']:.3f} s "
        f"(min {result['min_s']:.3f}, max {result['max_s']:.3f}); written to {out}"
    )
    return result


if __name__ == "__main__":
    main()
