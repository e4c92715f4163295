"""GPU smoke check of the full-size builders and of device_map loading (run on a GPU host):

python benchmarks/layout_check.py [name ...]   # prints one JSON line per check
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
import transformers

import vtrlab as vl
from vtrlab.testing import full_size, full_size_names, tiny
from vtrlab.testing.pixels import check_pixel_boxes, gradient_image
from vtrlab.testing.proof import assert_layout_proven


def check_device_map() -> dict:
    """A tiny model split by accelerate between GPU 0 and the CPU gives the CPU model's logits."""
    ref = tiny("llava")
    path = tempfile.mkdtemp()
    ref.model.save_pretrained(path)
    ref.processor.save_pretrained(path)
    split = vl.load(path, device_map="auto", max_memory={0: "300KB", "cpu": "1GB"})
    batch = ref.prepare([gradient_image(64, 40)], ["q"])
    with torch.no_grad():
        want = ref.model(**batch.inputs).logits
        got = split.model(**batch.to("cuda").inputs).logits.cpu()
    return {
        "devices": sorted({str(d) for d in split.model.hf_device_map.values()}),
        "max_abs_diff": float((got - want).abs().max()),
    }


def check_full_size(name: str) -> dict:
    t = time.time()
    vlm = full_size(name, "bfloat16", "cuda")
    torch.cuda.synchronize()
    build = time.time() - t
    batch = vlm.prepare([gradient_image(640, 480), gradient_image(480, 800)], ["What is in the image?", "Describe it."])
    with torch.no_grad():
        vlm.model(**batch.inputs)
        torch.cuda.synchronize()
        t = time.time()
        out = vlm.model(**batch.inputs)
        torch.cuda.synchronize()
        fwd = time.time() - t
    proven = assert_layout_proven(vlm, batch, [1, 1])
    boxes = (
        check_pixel_boxes(vlm, batch, patch=vlm.model.config.vision_config.patch_size)
        if hasattr(vlm.adapter, "vision_crops")
        else None
    )
    res = {
        "build_s": round(build, 1),
        "params_b": round(sum(p.numel() for p in vlm.model.parameters()) / 1e9, 3),
        "seq_len": int(batch.inputs["input_ids"].shape[1]),
        "image_tokens": [int(lay.n_image_tokens) for lay in batch.layouts],
        "forward_s_batch2": round(fwd, 3),
        "proven_positions": proven,
        "pixel_boxes_checked": boxes,
        "finite": bool(torch.isfinite(out.logits).all()),
        "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    del vlm, out
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return res


if __name__ == "__main__":
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name()}
    print(json.dumps({"env": env}), flush=True)
    print(json.dumps({"device_map": check_device_map()}), flush=True)
    for name in sys.argv[1:] or full_size_names():
        print(json.dumps({name: check_full_size(name)}), flush=True)
