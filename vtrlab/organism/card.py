"""Render the organism's model card (README.md) from its template (card_template.md) and the
records beside the bundle: config.json, eval.json, train_record.json, realism.json (optional) and
benchmarks/results/organism_forward.json (optional). ``vtrlab organism card [BUNDLE]``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from string import Template

from vtrlab.io import atomic_write_text, replace_marked_section

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("card_template.md")
# issue 10's targets (greedy exact match, held-out seed, >= 500 per family)
TARGETS = {"color": 0.98, "shape": 0.98, "count": 0.98, "reading": 0.98, "position": 0.98, "relation": 0.95}
BLANK_SLACK = 0.05  # the blank-picture baseline counts as "at chance" up to chance + this


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt_range(values) -> str:
    vals = [v for v in values if v is not None]
    return f"{min(vals):.3f} to {max(vals):.3f}" if vals else "n/a"


def target_lines(ev: dict) -> str:
    out = []
    for fam, r in ev["families"].items():
        goal = TARGETS.get(fam)
        if goal is None:
            continue
        wrong = round((1 - r["accuracy"]) * r["n"])
        met = "met" if r["accuracy"] >= goal else "**not met**"
        out.append(f"- {fam}: {r['accuracy']:.3f} ({wrong} of {r['n']} wrong) against >= {goal:.2f}: {met}")
    blank = [
        f"{f} {r['no_image_accuracy']:.3f} (chance {r['chance']:.3f})"
        for f, r in ev["families"].items()
        if "no_image_accuracy" in r
    ]
    at_chance = all(
        r["no_image_accuracy"] <= r["chance"] + BLANK_SLACK for r in ev["families"].values() if "no_image_accuracy" in r
    )
    out.append(
        f"- blank-picture baseline at chance (<= chance + {BLANK_SLACK}): "
        f"{'met' if at_chance else '**not met**'} ({', '.join(blank)})"
    )
    return "\n".join(out)


def _last(log: list, stage: str) -> dict:
    entries = [e for e in log if e.get("stage") == stage]
    return entries[-1] if entries else {}


def stage_rows(rec: dict) -> str:
    cfg, st, log = rec["config"], rec["stages"], rec["log"]
    what = {
        "clip": (
            "tower + text encoder + projections (+ dense heads)",
            "images vs captions (InfoNCE) + per-patch targets",
            cfg["clip_steps"],
            cfg["lr_clip"],
        ),
        "text": (
            "LM (embeddings, layers, head)",
            "caption + question + answer as plain text",
            cfg["text_steps"],
            cfg["lr_text"],
        ),
        "align": ("projector (LLaVA stage 1)", "image -> caption", cfg["align_steps"], cfg["lr_align"]),
        "instruct": (
            "projector + LM (LLaVA stage 2; tower frozen)",
            "image + question -> answer, 6 families",
            cfg["instruct_steps"],
            cfg["lr_lm"],
        ),
    }
    rows = []
    for name, (who, data, planned, lr) in what.items():
        s = st.get(name, {})
        last = _last(log, name)
        if name == "clip":
            acc = last.get("dense_acc", {})
            end = (
                f"caption retrieval top-1 in-batch {last.get('clip_top1', float('nan')):.3f} (train), "
                f"{s.get('val_clip_top1', float('nan')):.3f} (validation, batches of 256); dense accuracy "
                + ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
            )
        else:
            end = f"loss {last.get('loss', float('nan')):.3f}"
            if name == "instruct" and rec.get("val"):
                end += "; validation " + ", ".join(f"{k} {v:.2f}" for k, v in rec["val"].items())
        steps = f"{s.get('steps_done', 0)}" + ("" if s.get("steps_done") == planned else f" of {planned}")
        if s.get("cut_short"):
            steps += " (cut short)"
        rows.append(f"| {name} | {who} | {data} | {steps} | {lr:g} | {s.get('seconds', 0):.0f} | {end} |")
    return "\n".join(rows)


def call_lines(rec: dict) -> str:
    out = []
    for i, c in enumerate(rec["calls"], 1):
        where = (
            f"stopped at {c['stopped_at']['stage']} step {c['stopped_at']['step']} (checkpoint)"
            if "stopped_at" in c
            else "finished: evaluated and saved"
        )
        out.append(
            f"{i}. `{c['command']}` on {c['device']}, started {c['started']}: {c.get('seconds', 0):.0f} s "
            f"(data {c.get('data_seconds', 0):.0f} s), {where}."
        )
    return "\n".join(out)


def trajectory(rec: dict) -> str:
    vals = [e for e in rec["log"] if e.get("stage") == "instruct" and "val" in e]
    if not vals:
        return "(none recorded)"
    fams = list(vals[-1]["val"])
    head = "| step | " + " | ".join(fams) + " |\n|---|" + "---|" * len(fams)
    rows = [f"| {e['step']} | " + " | ".join(f"{e['val'][f]:.2f}" for f in fams) + " |" for e in vals]
    return head + "\n" + "\n".join(rows)


def tried_lines(tried: list[dict]) -> list[str]:
    """One line per recorded attempt (records/tried/*.json): what changed, and the validation it reached."""
    out = []
    for a in tried:
        vals = a.get("val") or []
        if not vals:
            continue
        fams = list(vals[-1]["val"])
        last = vals[-1]
        spread = {
            f: (min(v["val"][f] for v in vals[1:] or vals), max(v["val"][f] for v in vals[1:] or vals)) for f in fams
        }
        rel = spread.get("relation")
        out.append(
            f"- Tried ({a.get('date', '?')}, {a.get('device', '?')}): {a['what']}; why: {a['why']}. "
            f"Validation at instruct step {last['step']} (of {a['instruct_steps_done']} run): "
            + ", ".join(f"{f} {last['val'][f]:.2f}" for f in fams)
            + (
                f" (relation within {rel[0]:.2f}-{rel[1]:.2f} from step {vals[1]['step']} on)"
                if rel and len(vals) > 1
                else ""
            )
            + f"; {a.get('stopped', '')}. Command: `{a['command']}`; log `records/tried/{a['log']}`."
        )
    return out


def load_tried(bundle: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((bundle / "records" / "tried").glob("*.json"))]


def not_met(ev: dict, rec: dict, tried: list[dict] = ()) -> str:
    missed = {f: r["accuracy"] for f, r in ev["families"].items() if f in TARGETS and r["accuracy"] < TARGETS[f]}
    if not missed:
        return "\n".join(
            [
                "Every target of issue 10 is met. Earlier attempts, each recorded under `records/tried/` "
                "(relation asked yes/no over four relations stayed at chance without LM-internal supervision; "
                "asked in GQA's choose form, beside a one-hop family on both axes, it was learned):",
                *tried_lines(tried),
            ]
        )
    vals = [e for e in rec["log"] if e.get("stage") == "instruct" and "val" in e]
    lines = []
    for fam, acc in missed.items():
        traj = ", ".join(f"{e['step']}: {e['val'][fam]:.2f}" for e in vals)
        lines.append(
            f"- **{fam}**: held-out {acc:.3f} against >= {TARGETS[fam]:.2f}; validation by instruct step: {traj}."
        )
    if "relation" in missed:
        blank = ev["families"]["relation"].get("no_image_accuracy", float("nan"))
        lines.append(
            f"- relation stayed at chance through all {rec['stages']['instruct']['steps_done']} instruct steps "
            f"(blank-picture baseline {blank:.3f}), although the one-hop position family was learned at once and the "
            "tower's features carry positions (dense centre and row/col targets). No LM-internal supervision was "
            "used (v1 needed it); this run's differences from the throwaway probe of issue 10, which learned "
            "relation without it, are a tower frozen during instruction tuning (LLaVA-1.5), the text-only LM stage "
            "and the projector-alignment stage before it, and the system prompt."
        )
    lines += tried_lines(tried)
    lines.append(
        '- Not tried yet: a vertical one-hop stepping stone ("is the <colour> <shape> above or below ?"; the '
        "one-hop family covers only left/right, relation asks both axes) and shape-only one-hop questions "
        "(relation names shapes without colours); the tower trained in the instruct stage "
        "(`--lr-tower-instruct 5e-5`, as LLaVA-NeXT tunes its tower)."
    )
    return "\n".join(lines)


def _raster_verdict(rho: list) -> str:
    if max(rho) < 0.2 and min(rho) <= -0.2:
        layers = ", ".join(str(i) for i, r in enumerate(rho) if r <= -0.2)
        return f": favours early (top) tokens in layers {layers}, **the opposite of LLaVA-1.5**"
    if min(rho) > -0.2 and max(rho) >= 0.2:
        return ": favours late (bottom) tokens, as in LLaVA-1.5"
    return ""


_COMPARE_HEAD = "| quantity | organism v2 | published for LLaVA-1.5 / CLIP ViTs |\n|---|---|---|\n"


def realism_parts(re_: dict | None) -> dict:
    if re_ is None:
        return {
            "realism_rows": "| (realism.json missing: run `vtrlab organism realism`) |",
            "realism_compare": "",
            "realism_command": "vtrlab organism realism",
            "realism_n": 0,
        }
    sh = re_["last_row_share"]
    rows = []
    for i in range(re_["lm_layers"]):
        rows.append(
            f"| {i} | {sh['first'][i]:.3f} | {sh['system'][i]:.3f} | {sh['image'][i]:.3f} | "
            f"{sh['question'][i]:.3f} | {sh['tail'][i]:.3f} | {re_['last_row_spearman_raster'][i]:+.2f} | "
            f"{re_['question_to_image_share'][i]:.3f} |"
        )
    deep = slice(2, None)
    n_high = re_["high_norm_tokens_per_image"]
    cmp_ = [
        (
            "attention sink: first token / system prompt, deep layers",
            f"first token {_fmt_range(sh['first'][deep])}, rest of system prompt {_fmt_range(sh['system'][deep])} "
            "(layers 2+): **no sink**",
            "FastV (Chen et al., 2024): from layer 2 on, system-prompt tokens (few) receive a large share of attention "
            "(an attention sink) while image tokens receive little",
        ),
        (
            "image tokens' share of the last row, layers 0-1 vs 2+",
            f"{_fmt_range(sh['image'][:2])} vs {_fmt_range(sh['image'][deep])}: **stays high**",
            "FastV: image tokens get much attention in the two shallow layers and far less than their number (~576 "
            "tokens) would suggest from layer 2 on",
        ),
        (
            "last-row attention vs raster order (Spearman)",
            f"{_fmt_range(re_['last_row_spearman_raster'])} by layer"
            + _raster_verdict(re_["last_row_spearman_raster"]),
            "FEATHER (Endo et al., 2024): attention from the last token favours late (bottom-of-image) tokens, "
            "attributed to RoPE's long-term decay",
        ),
        (
            "image -> question flow",
            f"question words put {_fmt_range(re_['question_to_image_share'])} of their attention on image tokens "
            "(possible now: the image comes first)",
            "Zhang et al. (2024): image information flows into the question tokens in the lower layers; the question "
            "then flows to the last position in the middle-to-higher layers",
        ),
        (
            f"high-norm tokens in the tower (norm > {re_['high_norm_factor']:g}x median)",
            f"{_fmt_range(n_high)} per image by layer; largest norm / median "
            f"{max(re_['max_norm_over_median_max']):.2f}: "
            "**none**",
            "Darcet et al. (2024): large, long-trained ViTs (OpenCLIP, DINOv2, ...) have ~2% high-norm tokens on "
            "low-information background patches that absorb most of [CLS]'s attention; small or briefly trained "
            "models do not",
        ),
        (
            "[CLS] attention concentration (last tower layer)",
            f"top 1% of patches hold {re_['cls_attention_top1pct']:.3f} (uniform: "
            f"{re_['cls_attention_uniform_top1pct']:.3f}), top 10% hold {re_['cls_attention_top10pct']:.3f}; "
            "[CLS] is trained (contrastive)",
            "[CLS]-attention pruning methods (FasterVLM, VisionZip, ...) rely on a concentrated [CLS] attention in "
            "CLIP ViT-L",
        ),
        (
            "image hidden states depend on the question",
            f"largest relative change over all layers {re_['image_state_question_dependence_max']:.1e} "
            "(float rounding): **no**",
            "LLaVA: image before the question under causal attention, so they cannot",
        ),
    ]
    compare = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in cmp_)
    compare = _COMPARE_HEAD + compare
    return {
        "realism_rows": "\n".join(rows),
        "realism_compare": compare,
        "realism_command": re_["command"],
        "realism_n": re_["n_samples"],
    }


def bench_line(n_parameters: int) -> str:
    b = _json(ROOT / "benchmarks" / "results" / "organism_forward.json")
    if b is None or b.get("n_parameters") != n_parameters:
        return (
            "CPU forward: not measured for this model (`python benchmarks/organism_forward.py` writes "
            "benchmarks/results/organism_forward.json)."
        )
    load = b.get("load_average") or [float("nan")]
    busy = ""
    if load[0] > 1.5 * (b.get("cpu_count") or 1):
        busy = (
            f" The machine was oversubscribed ({load[0]:.1f} runnable processes on {b.get('cpu_count')} cores): "
            "this is not a valid measurement against the target; rerun on a quiet machine."
        )
    return (
        f"CPU forward of a batch of 8 (prompt of {b['seq_len']} tokens, no generation) on {b['threads']} threads: "
        f"median **{b['median_s']:.3f} s** (target <= {b['target_s']} s), fastest {b['min_s']:.3f} s, over "
        f"{b['repeats']} runs, on a shared machine with load average {load[0]:.1f} "
        "(`python benchmarks/organism_forward.py`, benchmarks/results/organism_forward.json)." + busy
    )


def render(bundle: str | os.PathLike) -> str:
    bundle = Path(bundle)
    ev = json.loads((bundle / "eval.json").read_text())
    cfg = json.loads((bundle / "config.json").read_text())
    rec = json.loads((bundle / "train_record.json").read_text())
    clip = _json(bundle / "clip" / "config.json") or {"text_config": {}, "projection_dim": 0}
    v, t, c = cfg["vision_config"], cfg["text_config"], clip["text_config"]
    tc = rec["config"]
    size = sum(p.stat().st_size for p in bundle.rglob("*.safetensors")) / 1e6
    from vtrlab.organism.processor import user_message

    try:
        from transformers import AutoProcessor

        template = AutoProcessor.from_pretrained(bundle).apply_chat_template(
            user_message("QUESTION"), add_generation_prompt=True
        )
    except Exception as e:  # pragma: no cover - the card must still render the rest
        template = f"(processor not loadable: {e})"
    grid = v["image_size"] // v["patch_size"]
    fields = dict(
        n_params=f"{ev['n_parameters']:,}",
        size_mb=f"{size:.1f}",
        image_size=v["image_size"],
        patch=v["patch_size"],
        grid=grid,
        n_image=grid * grid,
        v_layers=v["num_hidden_layers"],
        v_dim=v["hidden_size"],
        v_heads=v["num_attention_heads"],
        t_layers=t["num_hidden_layers"],
        t_dim=t["hidden_size"],
        t_heads=t["num_attention_heads"],
        vocab=t["vocab_size"],
        c_layers=c.get("num_hidden_layers", "?"),
        c_dim=c.get("hidden_size", "?"),
        c_proj=clip.get("projection_dim", "?"),
        template=template.replace("<image>" * (grid * grid), "<image>x" + str(grid * grid)),
        eval_n=ev["n_per_family"],
        eval_seed=ev["seed"],
        eval_rows="\n".join(
            f"| {f} | {r['accuracy']:.3f} | {r.get('no_image_accuracy', float('nan')):.3f} | {r['chance']:.3f} |"
            for f, r in ev["families"].items()
        ),
        target_lines=target_lines(ev),
        bench_line=bench_line(ev["n_parameters"]),
        stage_rows=stage_rows(rec),
        batch=tc["batch_size"],
        wd=tc["weight_decay"],
        warmup=tc["warmup"],
        n_train=tc["n_train_per_family"],
        instruct_data=(
            f"The instruct stage draws {tc['n_instruct_per_family']} fresh samples per call for a family of weight 1 "
            "(scaled by its weight; data seed 100 + call index), so no sample is seen twice."
            if tc.get("n_instruct_per_family")
            else "The instruct stage reuses the stage-1 samples."
        ),
        n_val=tc["n_val_per_family"],
        family_weights=", ".join(f"{k} {v:g}" for k, v in tc["family_weights"].items()),
        call_lines=call_lines(rec),
        trajectory=trajectory(rec),
        not_met=not_met(ev, rec, load_tried(Path(bundle))),
        **realism_parts(_json(bundle / "realism.json")),
    )
    return Template(TEMPLATE.read_text()).substitute(fields)


def readme_summary(bundle: str | os.PathLike) -> str:
    """The project README's organism section: held-out accuracy and the realism comparison, from
    the bundle's records (eval.json, realism.json)."""
    bundle = Path(bundle)
    ev = json.loads((bundle / "eval.json").read_text())
    acc = ", ".join(f"{f} {r['accuracy']:.3f}" for f, r in ev["families"].items())
    missed = [f for f, r in ev["families"].items() if f in TARGETS and r["accuracy"] < TARGETS[f]]
    lines = [f"Held-out accuracy ({ev['n_per_family']} per family, greedy exact match, `eval.json`): {acc}."]
    if missed:
        lines.append(
            f"Below target: {', '.join(missed)} -- findings on these families are about a model that has not "
            "learned them (the card lists what was tried)."
        )
    re_ = _json(bundle / "realism.json")
    if re_ is not None:
        lines += [
            "",
            f"Realism of v2 beside published LLaVA-1.5 findings (`realism.json`, {re_['n_samples']} held-out "
            "samples; the per-layer table is in the card):",
            "",
            realism_parts(re_)["realism_compare"],
        ]
    return "\n".join(lines)


def write_card(
    bundle: str | os.PathLike = ROOT / "data" / "models" / "organism", readme: str | os.PathLike | None = None
) -> Path:
    """Render the card into the bundle; with ``readme`` (the project README), also its organism section."""
    bundle = Path(bundle)
    text = render(bundle)
    if readme is not None:
        replace_marked_section(readme, "organism-summary", readme_summary(bundle))
    return atomic_write_text(bundle / "README.md", text)
