"""Train a selector for a VLM on synthetic organism images and save it.

    python -m vtrlab.recon.train --model organism --out data/models/organism/selector

Features come from the images only (the question does not reach the vision encoder), drawn at
data seed 3: the organism trains on seeds 1-2 and is evaluated on seed 0, so seed 0 stays held
out for the selector too.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .features import SampleFeatures, resolve_vision_layer, vision_features
from .selector import Selector, SelectorConfig, train_selector

SELECTOR_DATA_SEED = 3  # organism: train 1, val 2, held-out eval 0


def synthetic_features(
    vlm: Any, n: int, seed: int, layer: int | None = None, batch_size: int = 64, progress: bool = True
) -> tuple[list[SampleFeatures], list[Any]]:
    """Vision features of ``n`` synthetic samples (all families, round robin) at data ``seed``."""
    from ..data.synthetic import generate

    layer = resolve_vision_layer(vlm, layer)
    samples = generate(n, seed)
    feats: list[SampleFeatures] = []
    for a in tqdm(range(0, n, batch_size), desc="features", disable=not progress):
        chunk = samples[a : a + batch_size]
        batch = vlm.prepare([s.image for s in chunk], [s.question for s in chunk])
        feats += vision_features(vlm, batch, layer)[layer]
    return feats, samples


def train_for(
    vlm: Any,
    n_train: int = 4000,
    n_val: int = 256,
    steps: int = 3000,
    batch_size: int = 32,
    lr: float = 3e-4,
    p: float = 0.5,
    tau: float = 1.0,
    d_model: int = 128,
    n_heads: int = 4,
    ff_mult: int = 4,
    selector_layers: int = 3,
    reconstructor_layers: int = 3,
    layer: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    data_seed: int = SELECTOR_DATA_SEED,
    progress: bool = True,
) -> tuple[Selector, Any]:
    """Extract features and train; returns (selector, history)."""
    layer = resolve_vision_layer(vlm, layer)
    feats, _ = synthetic_features(vlm, n_train + n_val, data_seed, layer, progress=progress)
    train, val = feats[:n_train], feats[n_train:]
    cfg = SelectorConfig(
        feature_dim=int(train[0].features.shape[1]),
        d_model=d_model,
        n_heads=n_heads,
        ff_mult=ff_mult,
        selector_layers=selector_layers,
        reconstructor_layers=reconstructor_layers,
        p=p,
        tau=tau,
        vision_layer=layer,
        model=getattr(vlm, "name", ""),
        extra={
            "n_train": n_train,
            "n_val": n_val,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "data_seed": data_seed,
            "data": "vtrlab.data.synthetic.generate (all families)",
        },
    )
    return train_selector(
        train,
        cfg,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        eval_samples=val or None,
        eval_every=max(steps // 20, 10),
        progress=progress,
    )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="organism", help="model to load with vtrlab.load (default: organism)")
    ap.add_argument("--out", required=True, help="directory to write the selector to (atomic)")
    ap.add_argument("--n-train", type=int, default=4000, help="training images")
    ap.add_argument("--n-val", type=int, default=256, help="validation images (eval_recon curve)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--p", type=float, default=0.5, help="target keep ratio in max(mean(M), p)")
    ap.add_argument("--tau", type=float, default=1.0, help="Gumbel-Softmax temperature")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--ff-mult", type=int, default=4, help="feed-forward width as a multiple of d-model")
    ap.add_argument("--layers", type=int, default=3, help="transformer layers of selector and of reconstructor")
    ap.add_argument("--vision-layer", type=int, default=None, help="default: the layer feeding the projector")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    from ..models import load

    torch.manual_seed(args.seed)
    vlm = load(args.model, device=args.device)
    t0 = time.time()
    sel, hist = train_for(
        vlm,
        n_train=args.n_train,
        n_val=args.n_val,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        p=args.p,
        tau=args.tau,
        d_model=args.d_model,
        n_heads=args.n_heads,
        ff_mult=args.ff_mult,
        selector_layers=args.layers,
        reconstructor_layers=args.layers,
        layer=args.vision_layer,
        seed=args.seed,
        device=args.device,
    )
    sel.config.extra["train_seconds"] = round(time.time() - t0, 1)
    sel.config.extra["command"] = "python -m vtrlab.recon.train " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    sel.save(args.out, history=hist)
    last = hist.iloc[-1].to_dict()
    print(
        json.dumps(
            {
                "out": args.out,
                "seconds": sel.config.extra["train_seconds"],
                **{k: round(float(v), 4) for k, v in last.items() if k != "step" and np.isfinite(v)},
            }
        )
    )


if __name__ == "__main__":
    main()
