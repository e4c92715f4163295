"""Training recipe of the organism (one command: train, evaluate, save).

Stages (what a probe here and the runs recorded in the model card found necessary):

1. ``tower``: the vision tower alone learns dense per-patch targets from the generator's ground
   truth (color, shape, letter, object centre, and positions: the patch's own row/col and its
   object's centre). Trained end to end from scratch the model only learns the answer prior.
2. ``frozen``: projector + LM learn to answer with the tower frozen.
3. ``joint``: everything trains, the tower at a lower rate and still under the dense targets
   so that its per-patch meaning (and with it the relevance ground truth) is kept.

In the answer stages, relation questions also carry *referent supervision* of the LM
(``ref_weight``): the image tokens learn which of them are A / B, the answering token learns where
A and B are. Without it relation stayed at chance; with it the yes/no comparison followed.

Usage: ``python -m vtrlab.organism.train --out DIR`` (``vtrlab organism train --out DIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vtrlab.data.synthetic import BACKGROUND, FAMILIES
from vtrlab.models.base import image_token_id
from vtrlab.organism.dataset import (
    N_CENTRE,
    N_COLOR,
    N_LETTER,
    N_SHAPE,
    EncodedSet,
    build_set,
)


@dataclass
class TrainConfig:
    seed: int = 0  # model init and batch order
    init_from: str = ""  # a saved organism to continue from (empty: random init)
    train_seed: int = 1  # data seed of the training samples (evaluation uses seed 0: held out)
    val_seed: int = 2  # data seed of the validation samples watched during training
    n_train_per_family: int = 24000
    n_val_per_family: int = 256
    # chat template: question first, then the image (the shipped recipe: at equal steps it learned
    # color 0.99 vs 0.89 and shape 0.98 vs 0.87 with the image first); True gives LLaVA's order
    image_first: bool = False
    positional: bool = True  # dense row/col + object-centre regression targets for the tower
    tower_steps: int = 2000
    tower_rounds: int = 2  # the tower stage is run this many times (warm restarts)
    frozen_steps: int = 3000
    joint_steps: int = 8000
    batch_size: int = 256
    lr_tower: float = 1e-3
    lr_lm: float = 1e-3
    lr_tower_joint: float = 2e-4
    weight_decay: float = 0.01
    aux_weight: float = 1.0  # weight of the dense targets in the joint stage
    # referent supervision of the LM on relation questions (0: off): image tokens at layer
    # ref_role_layer learn which of them belong to A / B, the last prompt token at ref_xy_layer
    # learns A's and B's centres. Without it relation stayed at chance; with it, it was learned
    # (stage 3 of the model card).
    ref_weight: float = 1.0
    ref_role: bool = True  # False: only the positions at the last prompt token (ablation)
    ref_role_layer: int = 2
    ref_xy_layer: int = 4
    family_weights: dict = field(default_factory=lambda: {"color": 1.0, "shape": 1.0, "count": 1.5,
                                                           "relation": 2.0, "reading": 1.5})
    workers: int = max(1, (os.cpu_count() or 2) - 1)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    amp: bool = True  # bf16 autocast on CUDA
    max_minutes: float = 9.0  # wall-time budget of the whole run (data, training, evaluation)
    reserve_seconds: float = 90.0  # kept for the final evaluation and saving
    eval_every: int = 500
    eval_n: int = 500  # held-out samples per family for the final evaluation (seed 0)
    log_every: int = 100


class DenseHeads(nn.Module):
    """Linear read-outs of per-patch targets from the tower's selected hidden states."""

    def __init__(self, dim: int):
        super().__init__()
        self.color = nn.Linear(dim, N_COLOR)
        self.shape = nn.Linear(dim, N_SHAPE)
        self.letter = nn.Linear(dim, N_LETTER)
        self.centre = nn.Linear(dim, N_CENTRE)
        self.own_rc = nn.Linear(dim, 2)
        self.obj_xy = nn.Linear(dim, 2)

    def loss(self, feats: torch.Tensor, tg: dict[str, torch.Tensor], positional: bool, metrics: bool = True):
        """Summed loss, and (when ``metrics``; they sync the GPU) per-target losses and accuracies."""
        feats = feats.float()
        out, acc = {}, {}
        for key in ("color", "shape", "letter", "centre"):
            logits = getattr(self, key)(feats)
            out[key] = F.cross_entropy(logits.flatten(0, 1), tg[key].flatten())
            if metrics:
                fg = tg[key] > 0
                acc[key] = ((logits.argmax(-1) == tg[key]) & fg).sum().item() / max(1, fg.sum().item())
        if positional:
            out["own_rc"] = F.mse_loss(self.own_rc(feats), tg["own_rc"]) * 10
            on = tg["on_object"]
            err = (self.obj_xy(feats) - tg["obj_xy"]).pow(2).sum(-1)
            out["obj_xy"] = (err * on).sum() / on.sum().clamp(min=1) * 10
        parts = {k: round(v.item(), 4) for k, v in out.items()} if metrics else {}
        return sum(out.values()), parts, acc


class ReferentHeads(nn.Module):
    """Linear read-outs of the two hops of a relation question from the LM's hidden states:
    which image tokens are A / B (``role``), and where A and B are (``xy``, at the last prompt
    token, the one that predicts the answer)."""

    def __init__(self, dim: int):
        super().__init__()
        self.role = nn.Linear(dim, 3)
        self.xy = nn.Linear(dim, 4)

    def loss(self, hidden: dict[int, torch.Tensor], is_image: torch.Tensor, last: torch.Tensor,
             tg: dict[str, torch.Tensor], cfg: TrainConfig, metrics: bool = False):
        on = tg["ref_on"]
        if not bool(on.any()):  # no relation sample in the batch: a zero that keeps the graph
            return hidden[cfg.ref_xy_layer].sum() * 0.0, {}
        out = {}
        h_xy = hidden[cfg.ref_xy_layer].float()
        pred = self.xy(h_xy[torch.arange(len(last), device=last.device), last])[on]
        out["ref_xy"] = F.mse_loss(pred, tg["ref_xy"][on]) * 10
        if cfg.ref_role:
            h = hidden[cfg.ref_role_layer].float()
            n_img = tg["ref_role"].shape[1]
            img = h[is_image].view(len(last), n_img, -1)[on]
            logits = self.role(img)
            # A and B own ~5% of the patches: weighted so that "all background" is no easy optimum
            weight = torch.tensor([1.0, 10.0, 10.0], device=logits.device)
            out["ref_role"] = F.cross_entropy(logits.flatten(0, 1), tg["ref_role"][on].flatten(), weight=weight)
            if metrics:
                fg = tg["ref_role"][on] > 0
                out["ref_role_acc"] = ((logits.argmax(-1) == tg["ref_role"][on]) & fg).sum() / fg.sum().clamp(min=1)
        total = sum(v for k, v in out.items() if not k.endswith("_acc"))
        parts = {k: round(v.item(), 4) for k, v in out.items()} if metrics else {}
        return total, parts


def pixel_values(pixels_u8: torch.Tensor, processor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> normalised floats, as the organism's CLIP image processor does
    (rescale then normalise; its resize is a no-op at the native 128 px)."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, device=pixels_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=pixels_u8.device).view(1, 3, 1, 1)
    return (pixels_u8.float() * ip.rescale_factor - mean) / std


def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The vision features LLaVA feeds the projector: the selected layer, [CLS] dropped."""
    cfg = model.config
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    feats = out.hidden_states[cfg.vision_feature_layer]
    return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats


def answer_logits(model, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor):
    """Logits predicting each labelled token (same computation as LlavaForConditionalGeneration)."""
    logits, target, sel, _ = answer_forward(model, feats, input_ids, attention_mask, labels)
    return logits, target, sel


def answer_forward(model, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor, layers: tuple[int, ...] = ()):
    """``answer_logits`` plus the LM's hidden states after each of ``layers`` (1-based)."""
    image_embeds = model.model.multi_modal_projector(feats)
    embeds = model.get_input_embeddings()(input_ids)
    is_image = (input_ids == image_token_id(model.config)).unsqueeze(-1)
    embeds = embeds.masked_scatter(is_image, image_embeds.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask.long(),
                                     output_hidden_states=bool(layers))
    hidden = out.last_hidden_state
    # the token at t predicts labels[t + 1]
    target = labels[:, 1:]
    sel = target != -100
    logits = model.lm_head(hidden[:, :-1][sel])
    return logits, target[sel], sel, {k: out.hidden_states[k] for k in layers}


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


class _Sampler:
    """Batches drawn family by family with fixed weights (hard families more often)."""

    def __init__(self, data: EncodedSet, weights: dict, batch: int, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        fam = data.family.cpu()
        self.index = [torch.nonzero(fam == i).flatten() for i in range(len(FAMILIES))]
        w = torch.tensor([weights.get(f, 1.0) if len(self.index[i]) else 0.0 for i, f in enumerate(FAMILIES)])
        self.p = w / w.sum()
        self.batch = batch

    def __call__(self) -> torch.Tensor:
        fams = torch.multinomial(self.p, self.batch, replacement=True, generator=self.g)
        out = torch.empty(self.batch, dtype=torch.long)
        for i in range(len(FAMILIES)):
            m = fams == i
            if m.any():
                idx = self.index[i]
                out[m] = idx[torch.randint(len(idx), (int(m.sum()),), generator=self.g)]
        return out


@torch.no_grad()
def teacher_forced_accuracy(model, processor, data: EncodedSet, blank: bool = False, batch: int = 256) -> dict:
    """Per-family exact match with teacher forcing; equals greedy exact match (every answer
    token and the end token must be the argmax)."""
    model.eval()
    correct = torch.zeros(len(FAMILIES))
    total = torch.zeros(len(FAMILIES))
    dev = data.pixels.device
    for a in range(0, len(data), batch):
        sl = slice(a, a + batch)
        pix = data.pixels[sl]
        if blank:
            pix = torch.tensor(BACKGROUND, dtype=torch.uint8, device=dev).view(1, 3, 1, 1).expand_as(pix)
        with _autocast(dev):
            feats = tower_features(model, pixel_values(pix, processor))
            logits, target, sel = answer_logits(model, feats, data.input_ids[sl], data.attention_mask[sl], data.labels[sl])
        hit = torch.ones_like(sel)
        hit[sel] = logits.argmax(-1) == target
        ok = hit.all(dim=1).float().cpu()
        fam = data.family[sl].cpu()
        correct.index_add_(0, fam, ok)
        total.index_add_(0, fam, torch.ones_like(ok))
    model.train()
    return {f: round((correct[i] / total[i]).item(), 4) for i, f in enumerate(FAMILIES) if total[i] > 0}


def _autocast(device):
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def train_organism(out: str | os.PathLike, cfg: TrainConfig | None = None, **overrides) -> dict:
    """Train the organism from scratch, evaluate it on held-out data, save the bundle to ``out``.

    Returns the training record (config, per-stage logs, final evaluation)."""
    from vtrlab.organism.build import build_random, save_organism
    from vtrlab.organism.evaluate import eval_to_json, evaluate

    cfg = cfg or TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown training option {k!r}; accepted: {', '.join(asdict(cfg))}")
        setattr(cfg, k, v)
    t0 = time.time()
    deadline = t0 + cfg.max_minutes * 60 - cfg.reserve_seconds  # training stops here
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        # continue training a saved organism (its processor must match image_first)
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(cfg.init_from)
    else:
        model, _ = build_random(cfg.seed)
    from vtrlab.organism.processor import build_processor

    processor = build_processor(image_first=cfg.image_first)
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train = build_set(cfg.n_train_per_family, cfg.train_seed, processor, workers=cfg.workers).to(dev)
    val = build_set(cfg.n_val_per_family, cfg.val_seed, processor, workers=cfg.workers).to(dev)
    record: dict = {"config": asdict(cfg), "data_seconds": round(time.time() - t0, 1), "log": []}
    print(f"data ready in {record['data_seconds']} s: {len(train)} train, {len(val)} val", flush=True)
    model.to(dev).train()
    heads = DenseHeads(model.config.vision_config.hidden_size).to(dev)
    ref_heads = ReferentHeads(model.config.text_config.hidden_size).to(dev)
    ref_layers = tuple(sorted({cfg.ref_xy_layer} | ({cfg.ref_role_layer} if cfg.ref_role else set())))
    image_token = image_token_id(model.config)
    sampler = _Sampler(train, cfg.family_weights, cfg.batch_size, cfg.seed)
    tower = list(model.model.vision_tower.parameters())
    rest = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower.")]
    if cfg.ref_weight > 0:
        rest += list(ref_heads.parameters())

    def run_stage(name: str, steps: int, groups: list[tuple[list, float]], answer: bool, dense_w: float,
                  share: float | None = None):
        """One stage. With ``share`` the step count is fitted, once, after a few timed steps, so
        that the stage takes at most that share of the wall time left (the cosine schedule then
        still anneals fully; the steps actually run are recorded)."""
        opt = torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups], weight_decay=cfg.weight_decay)
        params = [q for ps, _ in groups for q in ps]
        trainable = {id(q) for q in params}
        for p in list(model.parameters()) + list(heads.parameters()) + list(ref_heads.parameters()):
            p.requires_grad_(id(p) in trainable)
        bar = tqdm(total=steps, desc=name, mininterval=5)
        st = time.time()
        step = -1
        while step + 1 < steps:
            step += 1
            bar.update(1)
            if step == 10:
                t10 = time.time()
            if share is not None and step == 40:
                per_step = (time.time() - t10) / 30
                left = (deadline - time.time()) * share
                fitted = max(step + 1, min(steps, step + int(left / per_step)))
                if fitted < steps:
                    print(f"{name}: {per_step * 1000:.1f} ms/step; fitting {steps} -> {fitted} steps", flush=True)
                    record["log"].append({"stage": name, "fitted_steps": fitted, "planned_steps": steps})
                    steps = fitted
            if time.time() > deadline:
                print(f"{name}: wall-time limit reached at step {step}", flush=True)
                record["log"].append({"stage": name, "step": step, "cut_short": True})
                break
            for g, (_, lr) in zip(opt.param_groups, groups):
                g["lr"] = _lr(step, steps, lr)
            idx = sampler().to(dev)
            with _autocast(dev):
                feats = tower_features(model, pixel_values(train.pixels[idx], processor))
                loss = torch.zeros((), device=dev)
                parts, acc = {}, {}
                logging = step % cfg.log_every == 0 or step == steps - 1
                if dense_w > 0:
                    dl, parts, acc = heads.loss(feats, {k: v[idx] for k, v in train.targets.items()}, cfg.positional,
                                                metrics=logging)
                    loss = loss + dense_w * dl
                if answer:
                    ids = train.input_ids[idx]
                    logits, target, sel, hidden = answer_forward(
                        model, feats, ids, train.attention_mask[idx], train.labels[idx],
                        layers=ref_layers if cfg.ref_weight > 0 else ())
                    al = F.cross_entropy(logits.float(), target)
                    if logging:
                        parts["answer"] = round(al.item(), 4)
                    loss = loss + al
                    if cfg.ref_weight > 0:
                        last = sel.float().argmax(1)  # the last prompt token predicts the first answer token
                        rl, rparts = ref_heads.loss(hidden, ids == image_token, last,
                                                    {k: v[idx] for k, v in train.targets.items()}, cfg, logging)
                        parts.update(rparts)
                        loss = loss + cfg.ref_weight * rl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if logging:
                entry = {"stage": name, "step": step, "loss": round(loss.item(), 4), **parts,
                         "dense_acc": {k: round(v, 3) for k, v in acc.items()},
                         "s_per_step": round((time.time() - st) / (step + 1), 4)}
                if answer and (step % cfg.eval_every == 0 or step == steps - 1):
                    entry["val"] = teacher_forced_accuracy(model, processor, val)
                record["log"].append(entry)
                print(json.dumps(entry), flush=True)
        bar.close()
        return step + 1

    head_params = list(heads.parameters())
    # the tower stage runs tower_rounds times (cosine warm restarts): letters are the slowest target
    tower_done = [run_stage("tower", cfg.tower_steps, [(tower + head_params, cfg.lr_tower)], answer=False, dense_w=1.0)
                  for _ in range(cfg.tower_rounds)]
    # the joint stage costs ~1.4x a frozen step (tower backward); share the time accordingly
    frozen_share = cfg.frozen_steps / max(1e-9, cfg.frozen_steps + 1.4 * cfg.joint_steps)
    record["steps"] = {"tower": tower_done}
    record["steps"]["frozen"] = run_stage("frozen", cfg.frozen_steps, [(rest, cfg.lr_lm)], answer=True,
                                          dense_w=0.0, share=frozen_share)
    record["steps"]["joint"] = run_stage("joint", cfg.joint_steps,
                                         [(rest, cfg.lr_lm * 0.5), (tower + head_params, cfg.lr_tower_joint)],
                                         answer=True, dense_w=cfg.aux_weight, share=1.0)
    record["train_seconds"] = round(time.time() - t0, 1)
    record["val"] = teacher_forced_accuracy(model, processor, val)
    record["val_blank"] = teacher_forced_accuracy(model, processor, val, blank=True)
    print("val", record["val"], "blank", record["val_blank"], flush=True)
    model.eval().float()
    for p in model.parameters():
        p.requires_grad_(True)
    extra = {}
    if cfg.eval_n > 0:
        te = time.time()
        result = evaluate(model, processor, n=cfg.eval_n, seed=0, device=dev, batch_size=250)
        record["eval_seconds"] = round(time.time() - te, 1)
        print("eval", json.dumps(result["families"]), flush=True)
        extra["eval.json"] = eval_to_json(result)
    model.to("cpu")
    save_organism(model, processor, out, extra_files={**extra, "train_record.json": json.dumps(record, indent=1)})
    return record


def parse_family_weights(text: str) -> dict:
    """"color=1,shape=1,count=1.5,relation=2,reading=1.5" -> dict (families not named keep 1.0)."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = part.partition("=")
        if name not in FAMILIES or not value:
            raise ValueError(f"bad family weight {part!r}; expected FAMILY=WEIGHT with FAMILY in {', '.join(FAMILIES)}")
        out[name] = float(value)
    return out


def _parse(argv=None) -> tuple[str, dict]:
    p = argparse.ArgumentParser(description="train the vtrlab organism (tiny LLaVA) and save it")
    p.add_argument("--out", required=True)
    for k, v in asdict(TrainConfig()).items():
        if isinstance(v, bool):
            p.add_argument(f"--{k.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        elif isinstance(v, (int, float, str)):
            p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None)
    p.add_argument("--family-weights", default=None, help="e.g. color=1,shape=1,count=1.5,relation=2,reading=1.5")
    a = vars(p.parse_args(argv))
    out = a.pop("out")
    if a.get("family_weights"):
        a["family_weights"] = parse_family_weights(a["family_weights"])
    return out, {k: v for k, v in a.items() if v is not None}


if __name__ == "__main__":
    out, overrides = _parse()
    train_organism(out, **overrides)
