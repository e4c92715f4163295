"""Training recipe of the organism: LLaVA's recipe in miniature, one resumable command.

Stages, in order (each one's steps, losses and wall time go into the record):

1. ``clip``: a micro-CLIP. The vision tower (with [CLS]) is trained contrastively against a small
   text encoder on the scenes' captions (symmetric InfoNCE between the tower's pooled [CLS] and the
   encoder's <|end|> state, each through a linear projection), together with dense per-patch
   targets from the generator's ground truth (colour, shape, letter, object centre, positions):
   without them, a probe found colour/shape/count/reading unlearnable downstream.
2. ``text``: the LM learns language on text alone: captions, questions and answers as plain text
   in the chat format (next-token loss on every token; no picture).
3. ``align``: LLaVA stage 1, projector alignment: tower and LM frozen, the projector learns
   image -> caption ("describe the picture .").
4. ``instruct``: LLaVA stage 2, instruction tuning: projector + LM learn to answer the VQA families
   (tower frozen, as LLaVA-1.5), image first after a short system prompt.

No loss reads the LM's internals: the only LM-side losses are next-token losses.

The run is resumable: when the wall-time budget of one call (``max_minutes``) is spent, the full
training state goes to ``ckpt_dir`` and the command ends; the same command with ``resume`` continues
where it stopped (stage, step, optimizer, sampler and RNG state), until the bundle is saved.

Usage: ``vtrlab organism train --out DIR [--resume]``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vtrlab.data.synthetic import BACKGROUND, FAMILIES
from vtrlab.io import atomic_path
from vtrlab.models.base import image_token_id
from vtrlab.organism.dataset import N_CENTRE, N_COLOR, N_LETTER, N_SHAPE, BuildStopped, EncodedSet, build_set

STAGES = ("clip", "text", "align", "instruct")


@dataclass
class TrainConfig:
    seed: int = 0  # model init and batch order
    train_seed: int = 1  # data seed of the training samples (evaluation uses seed 0: held out)
    val_seed: int = 2  # data seed of the validation samples watched during training
    n_train_per_family: int = 20000  # the clip, text and align stages (data seed train_seed)
    # instruct stage: fresh samples in every call (data seed instruct_seed + call index), this many
    # for a family of weight 1, scaled by the family's sampling weight, so every family is seen about
    # equally often per sample. A fixed set of 20k per family was memorised (v2, first run: relation's
    # training loss fell below chance while held-out relation stayed at 0.50) -- but fresh data did not
    # teach relation either while it was asked yes/no (records/tried/). 0: reuse the stage-1 set.
    n_instruct_per_family: int = 30000
    instruct_seed: int = 100
    n_val_per_family: int = 200
    batch_size: int = 256
    clip_steps: int = 3000
    lr_clip: float = 1e-3
    dense_weight: float = 1.0  # per-patch targets beside the contrastive loss in the clip stage (0: off)
    text_steps: int = 800
    lr_text: float = 5e-4
    align_steps: int = 600
    lr_align: float = 1e-3
    instruct_steps: int = 9000
    lr_lm: float = 5e-4  # projector + LM in the instruct stage (8 layers: 1e-3 failed in a probe)
    # tower in the instruct stage (0: frozen, as LLaVA-1.5); > 0 trains it (and the CLIP text side)
    # under its CLIP and dense losses, as LLaVA-NeXT tunes its tower
    lr_tower_instruct: float = 0.0
    warmup: int = 400  # instruct stage; the other stages warm up over 100 steps
    weight_decay: float = 0.01
    family_weights: dict = field(
        default_factory=lambda: {
            "color": 1.0,
            "shape": 1.0,
            "count": 2.5,  # the slowest closed-set family in every run so far
            "relation": 2.0,
            "reading": 1.5,
            "position": 1.5,  # two axes, two ways of naming the object
        }
    )
    workers: int = max(1, (os.cpu_count() or 2) - 1)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    max_minutes: float = 9.0  # wall-time budget of this call; then checkpoint and stop
    reserve_seconds: float = 40.0  # kept for checkpointing (or evaluating and saving) at the end
    eval_every: int = 500
    eval_n: int = 500  # held-out samples per family for the final evaluation (seed 0)
    eval_batch_size: int = 250
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

    def loss(self, feats: torch.Tensor, tg: dict[str, torch.Tensor], metrics: bool = True):
        """Summed loss, and (when ``metrics``; they sync the GPU) per-target losses and accuracies."""
        feats = feats.float()
        out, acc = {}, {}
        for key in ("color", "shape", "letter", "centre"):
            logits = getattr(self, key)(feats)
            out[key] = F.cross_entropy(logits.flatten(0, 1), tg[key].flatten())
            if metrics:
                fg = tg[key] > 0
                acc[key] = ((logits.argmax(-1) == tg[key]) & fg).sum().item() / max(1, fg.sum().item())
        out["own_rc"] = F.mse_loss(self.own_rc(feats), tg["own_rc"]) * 10
        on = tg["on_object"]
        err = (self.obj_xy(feats) - tg["obj_xy"]).pow(2).sum(-1)
        out["obj_xy"] = (err * on).sum() / on.sum().clamp(min=1) * 10
        parts = {k: round(v.item(), 4) for k, v in out.items()} if metrics else {}
        return sum(out.values()), parts, acc


def pixel_values(pixels_u8: torch.Tensor, processor) -> torch.Tensor:
    """uint8 (B,3,H,W) -> normalised floats, as the organism's CLIP image processor does
    (rescale then normalise; its resize is a no-op at the native 128 px)."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, device=pixels_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, device=pixels_u8.device).view(1, 3, 1, 1)
    return (pixels_u8.float() * ip.rescale_factor - mean) / std


def tower_forward(model, pixels: torch.Tensor):
    """(the vision features LLaVA feeds the projector: selected layer, [CLS] dropped; the pooled
    [CLS] state CLIP projects)."""
    cfg = model.config
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    feats = out.hidden_states[cfg.vision_feature_layer]
    feats = feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats
    return feats, out.pooler_output


def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    return tower_forward(model, pixels)[0]


def answer_logits(
    model, feats: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
):
    """Logits predicting each labelled token (same computation as LlavaForConditionalGeneration):
    (logits, targets, selection mask over positions 0..L-2)."""
    embeds = model.get_input_embeddings()(input_ids)
    if feats is not None:
        image_embeds = model.model.multi_modal_projector(feats)
        is_image = (input_ids == image_token_id(model.config)).unsqueeze(-1)
        embeds = embeds.masked_scatter(is_image, image_embeds.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask.long())
    target = labels[:, 1:]  # the token at t predicts labels[t + 1]
    sel = target != -100
    logits = model.lm_head(out.last_hidden_state[:, :-1][sel])
    return logits, target[sel], sel


def clip_loss(clip, image_pooled: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between projected [CLS] states and projected caption states."""
    text = clip.text_model(input_ids=ids, attention_mask=mask.long()).pooler_output
    img = F.normalize(clip.visual_projection(image_pooled).float(), dim=-1)
    txt = F.normalize(clip.text_projection(text).float(), dim=-1)
    logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2, logits


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
    was = model.training
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
            logits, target, sel = answer_logits(
                model, feats, data.input_ids[sl], data.attention_mask[sl], data.labels[sl]
            )
        hit = torch.ones_like(sel)
        hit[sel] = logits.argmax(-1) == target
        ok = hit.all(dim=1).float().cpu()
        fam = data.family[sl].cpu()
        correct.index_add_(0, fam, ok)
        total.index_add_(0, fam, torch.ones_like(ok))
    model.train(was)
    return {f: round((correct[i] / total[i]).item(), 4) for i, f in enumerate(FAMILIES) if total[i] > 0}


def _autocast(device):
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def instruct_counts(cfg: TrainConfig) -> dict[str, int]:
    """Samples per family of one call's fresh instruct set (weight-scaled; see TrainConfig)."""
    return {f: int(round(cfg.n_instruct_per_family * cfg.family_weights.get(f, 1.0))) for f in FAMILIES}


class _Background:
    """Build a training set in a thread (rendering runs in worker processes) while the GPU trains."""

    def __init__(self, fn):
        import threading

        self.stop = threading.Event()
        self.result, self.error = None, None
        self.started = time.time()
        self.thread = threading.Thread(target=self._run, args=(lambda: fn(self.stop),), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BuildStopped:
            pass
        except BaseException as e:  # re-raised in the training thread by get()
            self.error = e

    def cancel(self) -> None:
        """Not needed in this call: stop rendering (chunks already running finish)."""
        self.stop.set()
        self.thread.join()

    def get(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


def default_ckpt_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def train_organism(
    out: str | os.PathLike,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    ckpt_dir: str | os.PathLike | None = None,
    command: str | None = None,
    finish: bool = False,
    finish_reserve_seconds: float = 150.0,
    **overrides,
) -> dict:
    """Run (or, with ``resume``, continue) the recipe; save the bundle to ``out`` when every stage is done.

    Returns the training record; ``record["finished"]`` is False when the call's wall-time budget
    ran out first (the state is then in ``ckpt_dir``: run again with ``resume=True``). With ``finish``,
    a budget that runs out in the instruct stage ends training there instead (recorded as cut short),
    keeping ``finish_reserve_seconds`` to evaluate and save the bundle."""
    from transformers import CLIPModel

    from vtrlab.organism.build import build_random
    from vtrlab.organism.config import build_clip_config

    t0 = time.time()
    known = {f.name for f in TrainConfig.__dataclass_fields__.values()}
    for k in overrides:
        if k not in known:
            raise ValueError(f"unknown training option {k!r}; accepted: {', '.join(sorted(known))}")
    ckpt_dir = Path(ckpt_dir) if ckpt_dir else default_ckpt_dir(out)
    state_path = ckpt_dir / "state.pt"
    state = None
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"resume: no checkpoint at {state_path}; run without resume to start")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        cfg = TrainConfig(**{**state["record"]["config"], **overrides})
    else:
        cfg = cfg or TrainConfig()
        for k, v in overrides.items():
            setattr(cfg, k, v)
    deadline = t0 + cfg.max_minutes * 60 - (finish_reserve_seconds if finish else cfg.reserve_seconds)
    torch.manual_seed(cfg.seed)
    model, processor = build_random(cfg.seed)
    clip = CLIPModel(build_clip_config())
    heads = DenseHeads(model.config.vision_config.hidden_size)
    record = state["record"] if state else {"config": asdict(cfg), "stages": {}, "log": [], "calls": []}
    record["config"] = asdict(cfg)
    if state:
        model.load_state_dict(state["model"])
        clip.load_state_dict(state["clip"])
        heads.load_state_dict(state["heads"])
        torch.set_rng_state(state["rng"])
    call = {
        "command": command or " ".join(sys.argv),
        "device": _device_name(cfg.device),
        "resumed": bool(state),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "max_minutes": cfg.max_minutes,
        "finish": finish,
    }
    record["calls"].append(call)
    dev = torch.device(cfg.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    first = state["stage"] if state else 0
    fresh = cfg.n_instruct_per_family > 0
    instruct_stage = STAGES.index("instruct")
    needs_stage1 = first < instruct_stage or not fresh
    train = None
    if needs_stage1:
        train = build_set(cfg.n_train_per_family, cfg.train_seed, processor, workers=cfg.workers).to(dev)
    val = build_set(cfg.n_val_per_family, cfg.val_seed, processor, workers=cfg.workers).to(dev)
    instruct_data = None
    if fresh:  # this call's fresh instruct samples; built beside the earlier stages when there are any
        call["instruct_data_seed"] = cfg.instruct_seed + len(record["calls"]) - 1
        counts = instruct_counts(cfg)
        call["instruct_samples"] = sum(counts.values())
        instruct_data = _Background(
            lambda stop: build_set(counts, call["instruct_data_seed"], processor, workers=cfg.workers, stop=stop)
        )
    call["data_seconds"] = round(time.time() - t0, 1)
    print(f"data ready in {call['data_seconds']} s: {len(train) if train else 0} train, {len(val)} val", flush=True)
    model.to(dev).train()
    clip.to(dev).train()
    heads.to(dev).train()
    tower = list(model.model.vision_tower.parameters())
    projector = list(model.model.multi_modal_projector.parameters())
    lm = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    clip_side = [p for n, p in clip.named_parameters() if not n.startswith("vision_model.")]
    sampler = _Sampler(train if train is not None else val, cfg.family_weights, cfg.batch_size, cfg.seed)
    if state:
        sampler.g.set_state(state["sampler"])

    def use_instruct_data() -> None:
        """Switch the data (and the sampler) to this call's fresh instruct set."""
        nonlocal train, sampler
        tw = time.time()
        train = instruct_data.get().to(dev)
        call["instruct_data_wait_seconds"] = round(time.time() - tw, 1)
        call["instruct_data_build_seconds"] = round(time.time() - instruct_data.started, 1)
        print(f"fresh instruct data: {len(train)} samples (waited {call['instruct_data_wait_seconds']} s)", flush=True)
        sampler = _Sampler(train, cfg.family_weights, cfg.batch_size, cfg.seed + 1000 + len(record["calls"]))

    def save_state(stage_i: int, step: int, opt) -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "clip": clip.state_dict(),
                "heads": heads.state_dict(),
                "opt": opt.state_dict() if opt is not None else None,
                "stage": stage_i,
                "step": step,
                "sampler": sampler.g.get_state(),
                "rng": torch.get_rng_state(),
                "record": record,
            },
            state_path,
        )

    def stage_spec(name: str):
        if name == "clip":
            return cfg.clip_steps, [(tower + list(heads.parameters()) + clip_side, cfg.lr_clip)], 100
        if name == "text":
            return cfg.text_steps, [(lm, cfg.lr_text)], 100
        if name == "align":
            return cfg.align_steps, [(projector, cfg.lr_align)], 100
        groups = [(projector + lm, cfg.lr_lm)]
        if cfg.lr_tower_instruct > 0:
            groups.append((tower + list(heads.parameters()) + clip_side, cfg.lr_tower_instruct))
        return cfg.instruct_steps, groups, cfg.warmup

    def step_loss(name: str, idx: torch.Tensor, logging: bool):
        parts: dict = {}
        if name == "instruct" and cfg.lr_tower_instruct > 0:  # the tower trains too, under its own losses
            tower_loss, parts = step_loss("clip", idx, logging)
            feats = tower_features(model, pixel_values(train.pixels[idx], processor))
            s = train.seqs["answer"]
            logits, target, _ = answer_logits(model, feats, s.ids[idx], s.mask[idx], s.labels[idx])
            loss = F.cross_entropy(logits.float(), target)
            if logging:
                parts[name] = round(loss.item(), 4)
            return loss + tower_loss, parts
        if name == "clip":
            feats, pooled = tower_forward(model, pixel_values(train.pixels[idx], processor))
            cs = train.seqs["clip"]
            cl, logits = clip_loss(clip, pooled, cs.ids[idx], cs.mask[idx])
            loss = cl
            if cfg.dense_weight > 0:
                dl, parts, acc = heads.loss(feats, {k: v[idx] for k, v in train.targets.items()}, metrics=logging)
                loss = loss + cfg.dense_weight * dl
                if logging:
                    parts["dense_acc"] = {k: round(v, 3) for k, v in acc.items()}
            if logging:
                tgt = torch.arange(len(idx), device=logits.device)
                parts["clip"] = round(cl.item(), 4)
                parts["clip_top1"] = round((logits.argmax(1) == tgt).float().mean().item(), 3)
            return loss, parts
        if name == "text":
            s = train.seqs["text"]
            logits, target, _ = answer_logits(model, None, s.ids[idx], s.mask[idx], s.labels[idx])
        else:
            s = train.seqs["caption" if name == "align" else "answer"]
            with torch.no_grad():
                feats = tower_features(model, pixel_values(train.pixels[idx], processor))
            logits, target, _ = answer_logits(model, feats, s.ids[idx], s.mask[idx], s.labels[idx])
        loss = F.cross_entropy(logits.float(), target)
        if logging:
            parts[name] = round(loss.item(), 4)
        return loss, parts

    finished = True
    for stage_i in range(first, len(STAGES)):
        name = STAGES[stage_i]
        if name == "instruct" and fresh:
            use_instruct_data()
        steps, groups, warmup = stage_spec(name)
        params = [q for ps, _ in groups for q in ps]
        trainable = {id(q) for q in params}
        for p in list(model.parameters()) + list(clip.parameters()) + list(heads.parameters()):
            p.requires_grad_(id(p) in trainable)
        opt = torch.optim.AdamW([{"params": p, "lr": lr} for p, lr in groups], weight_decay=cfg.weight_decay)
        step = 0
        if state and stage_i == state["stage"]:
            step = state["step"]
            if state["opt"] is not None:
                opt.load_state_dict(state["opt"])
        srec = record["stages"].setdefault(name, {"planned_steps": steps, "seconds": 0.0, "steps_done": 0})
        st = time.time()
        step0 = step
        while step < steps:
            if time.time() > deadline:
                finished = False
                break
            for g, (_, lr) in zip(opt.param_groups, groups):
                g["lr"] = _lr(step, steps, lr, warmup)
            idx = sampler().to(dev)
            logging = step % cfg.log_every == 0 or step == steps - 1
            with _autocast(dev):
                loss, parts = step_loss(name, idx, logging)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if logging:
                entry = {
                    "stage": name,
                    "step": step,
                    "loss": round(loss.item(), 4),
                    **parts,
                    "s_per_step": round((time.time() - st) / (step - step0 + 1), 4),
                }
                if name == "instruct" and (step % cfg.eval_every == 0 or step == steps - 1):
                    entry["val"] = teacher_forced_accuracy(model, processor, val)
                record["log"].append(entry)
                print(json.dumps(entry), flush=True)
            step += 1
        srec["seconds"] = round(srec["seconds"] + time.time() - st, 1)
        srec["steps_done"] = step
        if not finished and finish and name == "instruct":
            srec["cut_short"] = True
            print(f"wall-time budget spent: instruct stage cut short at step {step}/{steps}; finishing", flush=True)
            finished = True
        if not finished:
            if instruct_data is not None and name != "instruct":
                instruct_data.cancel()  # the next call builds its own fresh set
            call["stopped_at"] = {"stage": name, "step": step}
            call["seconds"] = round(time.time() - t0, 1)
            save_state(stage_i, step, opt)
            print(
                f"wall-time budget spent: stopped at {name} step {step}/{steps}; checkpoint {state_path}; "
                "run again with --resume",
                flush=True,
            )
            record["finished"] = False
            return record
        if name == "clip":  # LLaVA's later stages keep the CLIP tower frozen: remember how it ended
            record["stages"]["clip"]["val_clip_top1"] = _clip_val(model, clip, processor, val)
        save_state(stage_i + 1, 0, None)
    record["val"] = teacher_forced_accuracy(model, processor, val)
    record["val_blank"] = teacher_forced_accuracy(model, processor, val, blank=True)
    print("val", record["val"], "blank", record["val_blank"], flush=True)
    call["train_seconds"] = round(time.time() - t0, 1)
    _finish(out, model, clip, processor, cfg, record, call, dev, t0)
    return record


@torch.no_grad()
def _clip_val(model, clip, processor, val: EncodedSet, batch: int = 256) -> float:
    """Top-1 image -> caption retrieval inside batches of ``batch`` validation samples."""
    model.eval()
    clip.eval()
    hits, n = 0, 0
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(val), generator=g).to(val.pixels.device)  # mix the families
    for a in range(0, len(val), batch):
        idx = order[a : a + batch]
        with _autocast(val.pixels.device):
            _, pooled = tower_forward(model, pixel_values(val.pixels[idx], processor))
            _, logits = clip_loss(clip, pooled, val.seqs["clip"].ids[idx], val.seqs["clip"].mask[idx])
        hits += int((logits.argmax(1) == torch.arange(len(idx), device=logits.device)).sum())
        n += len(idx)
    model.train()
    clip.train()
    return round(hits / max(1, n), 4)


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def _finish(out, model, clip, processor, cfg: TrainConfig, record: dict, call: dict, dev, t0: float) -> None:
    """Evaluate on held-out data and save the bundle (LLaVA + its micro-CLIP in ``clip/``)."""
    from vtrlab.organism.build import save_organism
    from vtrlab.organism.evaluate import eval_to_json, evaluate

    model.eval().float()
    clip.eval().float()
    extra = {}
    if cfg.eval_n > 0:
        te = time.time()
        result = evaluate(model, processor, n=cfg.eval_n, seed=0, device=dev, batch_size=cfg.eval_batch_size)
        call["eval_seconds"] = round(time.time() - te, 1)
        print("eval", json.dumps({f: r["accuracy"] for f, r in result["families"].items()}), flush=True)
        extra["eval.json"] = eval_to_json(result)
    model.to("cpu")
    clip.to("cpu")
    clip.vision_model.load_state_dict(model.model.vision_tower.state_dict())  # the one trained tower
    call["seconds"] = round(time.time() - t0, 1)
    record["finished"] = True
    extra["train_record.json"] = json.dumps(record, indent=1) + "\n"
    save_organism(model, processor, out, extra_files=extra, clip=clip)


def parse_family_weights(text: str) -> dict:
    """ "color=1,shape=1,count=1.5,relation=2,reading=1.5" -> dict (families not named keep 1.0)."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = part.partition("=")
        if name not in FAMILIES or not value:
            raise ValueError(f"bad family weight {part!r}; expected FAMILY=WEIGHT with FAMILY in {', '.join(FAMILIES)}")
        out[name] = float(value)
    return out
