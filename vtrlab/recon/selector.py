"""The adaptive token selector of "When Less is Enough" (Allakhverdov, Goncharova, Kuznetsov, 2025).

Given features F (L tokens x C) of one vision layer:

* selector: a few transformer layers -> linear -> one logit per token -> binary keep mask M by
  Gumbel-Softmax (hard in the forward pass, soft straight-through gradient in training);
* dropped tokens are replaced by one learned mask embedding; every slot gets a positional
  embedding (fixed 2-D sin-cos of the patch's row/col in the layout's vision table) so masked
  slots differ (tiles of multi-crop models share row/col positions);
* reconstructor: a few transformer layers that restore all L tokens;
* loss: reconstruction error + max(mean(M), p). Plain mean(M) collapses towards keeping nothing;
  the max stops the push once the kept fraction reaches the target p.
* inference: rank tokens by the selector's logits and keep the top k, for any budget.

The reconstructor sees each kept token's *own* feature only (not the selector's contextual
states), otherwise it could read dropped tokens through the selector's attention.
Features are standardised per channel (mean/std of the training set, stored with the weights),
and the reconstruction term is the mean squared error over tokens and channels of the
standardised features (the squared L2 norm per token divided by C), which keeps both loss terms
on a comparable scale for any layer width.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from vtrlab.io import atomic_dir

from .features import SampleFeatures, resolve_vision_layer, vision_features

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HISTORY_FILE = "history.csv"


@dataclass
class SelectorConfig:
    feature_dim: int  # C, width of the vision features
    d_model: int = 128
    n_heads: int = 4
    selector_layers: int = 3
    reconstructor_layers: int = 3
    ff_mult: int = 4
    p: float = 0.5  # target keep ratio of the max(mean(M), p) term
    tau: float = 1.0  # Gumbel-Softmax temperature
    vision_layer: int | None = None  # vision layer the features come from (None: projector input)
    model: str = ""  # the VLM the selector was trained for (informative)
    extra: dict = field(default_factory=dict)  # training recipe, for provenance

    def __post_init__(self):
        if self.feature_dim < 1 or self.d_model < 1 or self.n_heads < 1:
            raise ValueError(
                f"feature_dim, d_model, n_heads must be >= 1; got {self.feature_dim}, {self.d_model}, {self.n_heads}"
            )
        if self.d_model % self.n_heads or self.d_model % 4:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} and by 4 (2-D sin-cos)"
            )
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p={self.p}; accepted: a keep ratio in [0, 1]")
        if self.tau <= 0:
            raise ValueError(f"tau={self.tau}; accepted: a temperature > 0")


def sincos_2d(row: torch.Tensor, col: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding (..., dim) from integer grid coordinates."""
    quarter = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=row.device, dtype=torch.float32) / quarter)
    parts = []
    for coord in (row, col):
        ang = coord.float()[..., None] * freq
        parts += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(parts, dim=-1)


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly 0/1 (soft > 0.5). Backward: the gradient passes to the soft mask unchanged."""

    @staticmethod
    def forward(ctx, soft):
        return (soft > 0.5).to(soft.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def gumbel_keep_mask(
    logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary Gumbel-Softmax: returns (hard mask with straight-through gradient, soft mask).

    Two-class Gumbel-Softmax over (keep, drop) with logits (l, 0) reduces to
    sigmoid((l + g1 - g2) / tau), and g1 - g2 of two Gumbels is Logistic noise.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    return _StraightThrough.apply(soft), soft


def selector_loss(
    reconstructed: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor, p: float
) -> dict[str, torch.Tensor]:
    """Loss of the paper: reconstruction + max(mean(M), p), per sample, averaged over the batch.

    reconstructed/target (B, L, C); mask M and valid (B, L) (valid False on padding tokens).
    recon = mean over a sample's tokens of ||F_rec - F||^2 / C.
    """
    v = valid.to(target.dtype)
    n = v.sum(-1).clamp_min(1)
    per_token = ((reconstructed - target) ** 2).mean(-1)
    recon = (per_token * v).sum(-1) / n
    kept = (mask * v).sum(-1) / n
    ratio = torch.clamp(kept, min=p)  # max(mean(M), p)
    return {"loss": (recon + ratio).mean(), "recon": recon.mean(), "ratio": ratio.mean(), "kept": kept.mean()}


def _block(cfg: SelectorConfig, n_layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        cfg.d_model, cfg.n_heads, cfg.ff_mult * cfg.d_model, dropout=0.0, batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class Selector(nn.Module):
    """Selector + reconstructor over one vision layer's patch features."""

    def __init__(self, config: SelectorConfig):
        super().__init__()
        self.config = config
        c, d = config.feature_dim, config.d_model
        self.register_buffer("feature_mean", torch.zeros(c))
        self.register_buffer("feature_std", torch.ones(c))
        self.select_in = nn.Linear(c, d)
        self.selector = _block(config, config.selector_layers)
        self.select_norm = nn.LayerNorm(d)
        self.select_head = nn.Linear(d, 1)
        self.recon_in = nn.Linear(c, d)
        self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02)
        self.reconstructor = _block(config, config.reconstructor_layers)
        self.recon_norm = nn.LayerNorm(d)
        self.recon_out = nn.Linear(d, c)

    # --- core ------------------------------------------------------------------------------
    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.feature_mean) / self.feature_std

    def _pos(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        return sincos_2d(row, col, self.config.d_model)

    def logits(self, feats: torch.Tensor, row: torch.Tensor, col: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Selector logits (B, L) for raw features (B, L, C); padding gets -inf."""
        h = self.select_in(self.normalize(feats)) + self._pos(row, col)
        h = self.selector(h, src_key_padding_mask=~valid)
        out = self.select_head(self.select_norm(h)).squeeze(-1)
        return out.masked_fill(~valid, float("-inf"))

    def reconstruct(self, feats: torch.Tensor, keep: torch.Tensor, row, col, valid) -> torch.Tensor:
        """Standardised features rebuilt from the kept tokens; ``keep`` (B, L) in [0, 1] (1 = kept)."""
        own = self.recon_in(self.normalize(feats))
        m = keep[..., None].to(own.dtype)
        h = m * own + (1 - m) * self.mask_embedding + self._pos(row, col)
        h = self.reconstructor(h, src_key_padding_mask=~valid)
        return self.recon_out(self.recon_norm(h))

    def forward(self, feats, row, col, valid, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training forward: sampled hard mask with straight-through gradient, reconstruction, loss."""
        logits = self.logits(feats, row, col, valid)
        mask, soft = gumbel_keep_mask(logits.masked_fill(~valid, 0.0), self.config.tau, generator)
        mask = mask * valid
        rec = self.reconstruct(feats, mask, row, col, valid)
        out = selector_loss(rec, self.normalize(feats), mask, valid, self.config.p)
        out.update(logits=logits, mask=mask, soft=soft, reconstructed=rec)
        return out

    # --- inference -------------------------------------------------------------------------
    @staticmethod
    def topk_mask(scores: np.ndarray, ratio: float) -> np.ndarray:
        """Bool mask keeping exactly round(ratio * n) highest scores (ties broken by order)."""
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"ratio={ratio}; accepted: a keep ratio in [0, 1]")
        scores = np.asarray(scores, dtype=np.float64)
        k = int(round(float(ratio) * scores.shape[0]))
        keep = np.zeros(scores.shape[0], dtype=bool)
        keep[np.argsort(-scores, kind="stable")[:k]] = True
        return keep

    @torch.no_grad()
    def patch_scores(self, samples: Sequence[SampleFeatures]) -> list[np.ndarray]:
        """Selector logits per patch for each sample."""
        feats, row, col, valid = collate(samples, self.device)
        lg = self.logits(feats, row, col, valid).float().cpu().numpy()
        return [lg[i, : len(s.features)] for i, s in enumerate(samples)]

    def token_scores_from(self, samples: Sequence[SampleFeatures]) -> list[np.ndarray]:
        """Selector score per LM image token (layout order): mean logit of the patches it covers."""
        out = []
        for s, sc in zip(samples, self.patch_scores(samples)):
            tok = np.full(s.n_tokens, -np.inf)
            ok = s.token >= 0
            sums = np.bincount(s.token[ok], weights=sc[ok], minlength=s.n_tokens)
            cnt = np.bincount(s.token[ok], minlength=s.n_tokens)
            tok[cnt > 0] = sums[cnt > 0] / cnt[cnt > 0]
            out.append(tok)
        return out

    def features(self, vlm: Any, batch) -> list[SampleFeatures]:
        layer = resolve_vision_layer(vlm, self.config.vision_layer)
        return vision_features(vlm, batch, layer)[layer]

    def token_scores(self, vlm: Any, batch) -> list[np.ndarray]:
        """Per sample, the selector's score of each LM image token (layout order); higher = keep first."""
        return self.token_scores_from(self.features(vlm, batch))

    def select(self, vlm: Any, batch, ratio: float = 0.5) -> list[np.ndarray]:
        """Per sample, a bool keep mask over its LM image tokens (layout order) keeping the top
        round(ratio * n) tokens by the selector's logits; ``ratio=1.0`` keeps all."""
        return [self.topk_mask(s, ratio) for s in self.token_scores(vlm, batch)]

    # --- persistence -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save(self, path: str | os.PathLike, history: pd.DataFrame | None = None) -> Path:
        """Write config.json + model.safetensors (+ history.csv) atomically into directory ``path``."""
        path = Path(path)
        # keep files we do not write (e.g. README.md) when replacing an existing selector
        with atomic_dir(path, keep=lambda p: p.name not in (WEIGHTS_FILE, CONFIG_FILE, HISTORY_FILE)) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True) + "\n")
            if history is not None:
                history.to_csv(tmp / HISTORY_FILE, index=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Selector:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no selector; expected {CONFIG_FILE} and {WEIGHTS_FILE} in it")
        try:
            cfg = SelectorConfig(**json.loads((path / CONFIG_FILE).read_bytes().decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:  # bad JSON, unknown or bad fields
            raise ValueError(f"{path / CONFIG_FILE} is not a selector config: {str(exc).splitlines()[0]}") from None
        sel = cls(cfg)
        try:
            sel.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        except Exception as exc:  # SafetensorError (corrupt), RuntimeError (keys/shapes of another config)
            raise ValueError(
                f"{path / WEIGHTS_FILE} does not hold this selector's weights: {str(exc).strip().splitlines()[0]}"
            ) from None
        return sel.to(device).eval()

    @staticmethod
    def history(path: str | os.PathLike) -> pd.DataFrame:
        return pd.read_csv(Path(path) / HISTORY_FILE)


def collate(samples: Sequence[SampleFeatures], device: torch.device | str = "cpu"):
    """Pad per-sample features to (B, L, C) with a validity mask (True = real token)."""
    if not samples:
        raise ValueError("no samples to collate")
    length = max(len(s.features) for s in samples)
    c = samples[0].features.shape[-1]
    feats = torch.zeros(len(samples), length, c)
    row = torch.zeros(len(samples), length, dtype=torch.long)
    col = torch.zeros(len(samples), length, dtype=torch.long)
    valid = torch.zeros(len(samples), length, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.features)
        feats[i, :n] = s.features
        row[i, :n] = torch.as_tensor(np.array(s.row, dtype=np.int64))
        col[i, :n] = torch.as_tensor(np.array(s.col, dtype=np.int64))
        valid[i, :n] = True
    return feats.to(device), row.to(device), col.to(device), valid.to(device)


def train_selector(
    train: Sequence[SampleFeatures],
    config: SelectorConfig,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 3e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    eval_samples: Sequence[SampleFeatures] | None = None,
    eval_every: int = 100,
    progress: bool = True,
) -> tuple[Selector, pd.DataFrame]:
    """Train a selector on precomputed features; returns it (eval mode) and the training history.

    History columns: step, loss, recon, kept (mean hard mask), and where ``eval_samples`` is
    given, eval_recon at top-k with k = p (held-out reconstruction error of the inference rule).
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}; both must be >= 1")
    if not train:
        raise ValueError("no training samples")
    torch.manual_seed(seed)
    sel = Selector(config)
    all_feats = torch.cat([s.features for s in train]).double()
    sel.feature_mean.copy_(all_feats.mean(0).float())
    sel.feature_std.copy_(all_feats.std(0).clamp_min(1e-6).float())
    sel.to(device).train()
    opt = torch.optim.AdamW(sel.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows = []
    bar = tqdm(range(steps), desc="train selector", disable=not progress)
    for step in bar:
        idx = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
        feats, row, col, valid = collate([train[i] for i in idx], device)
        out = sel(feats, row, col, valid, generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(sel.parameters(), 1.0)
        opt.step()
        sched.step()
        rec = {"step": step, **{k: float(out[k].detach()) for k in ("loss", "recon", "kept")}}
        if eval_samples is not None and (step % eval_every == 0 or step == steps - 1):
            sel.eval()
            rec["eval_recon"] = topk_reconstruction_error(sel, eval_samples, config.p)
            sel.train()
        rows.append(rec)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{rec['loss']:.3f}", kept=f"{rec['kept']:.2f}")
    return sel.eval(), pd.DataFrame(rows)


@torch.no_grad()
def topk_reconstruction_error(
    sel: Selector, samples: Sequence[SampleFeatures], ratio: float, batch_size: int = 64
) -> float:
    """Mean standardised MSE when the top round(ratio * L) patches by logit are kept."""
    total, n = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        feats, row, col, valid = collate(chunk, sel.device)
        lg = sel.logits(feats, row, col, valid)
        keep = torch.zeros_like(valid)
        for i, s in enumerate(chunk):
            k = int(round(ratio * len(s.features)))
            keep[i, lg[i, : len(s.features)].topk(k).indices] = True
        rec = sel.reconstruct(feats, keep.float(), row, col, valid)
        err = ((rec - sel.normalize(feats)) ** 2).mean(-1)
        total += float((err * valid).sum())
        n += int(valid.sum())
    return total / max(n, 1)
