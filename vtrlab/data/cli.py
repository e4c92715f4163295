"""`vtrlab data ...`: check a dataset before a run, export the organism's samples as a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="Data for the notebooks: check a source, export the organism's samples.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("check")
def check(
    data: str = typer.Argument(..., help="organism, photos, or a path: .jsonl/.json/.parquet, folder, HF dataset"),
    n_samples: int | None = typer.Option(None, "--n-samples", help="seeded random subset of this size"),
    seed: int = typer.Option(0, "--seed"),
    question: str | None = typer.Option(None, "--question", help="question for an image folder"),
    image_column: str = typer.Option("image", "--image-column"),
    question_column: str = typer.Option("question", "--question-column"),
    answer_column: str | None = typer.Option(None, "--answer-column"),
    boxes_column: str = typer.Option("boxes", "--boxes-column"),
    mask_column: str = typer.Option("mask", "--mask-column"),
    box_format: str = typer.Option("xyxy", "--box-format", help="xyxy, xywh, xyxy_norm or xywh_norm"),
) -> None:
    """Load DATA as the notebooks would; print its identity and what it holds (answers, ground truth)."""
    from vtrlab.data.sources import load_data

    try:
        d = load_data(
            data,
            n_samples=n_samples,
            seed=seed,
            question=question,
            image_column=image_column,
            question_column=question_column,
            answer_column=answer_column,
            boxes_column=boxes_column,
            mask_column=mask_column,
            box_format=box_format,
        )
        for r in d:  # every picture opens and every box / mask fits its picture
            size = r.image_size()
            if r.has_ground_truth:
                from vtrlab.data.groundtruth import pixel_mask_for

                pixel_mask_for(r, size)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    with_gt = sum(r.has_ground_truth for r in d)
    with_answers = sum(bool(r.answers) for r in d)
    typer.echo(json.dumps(d.identity, indent=2))
    typer.echo(
        f"{len(d)} samples: {with_answers} with answers, {with_gt} with ground truth (boxes or masks); "
        f"groups: {', '.join(sorted(set(d.groups)))}"
    )


@app.command("export-organism")
def export(
    out: Path = typer.Argument(..., help="folder to write (replaced whole): manifest.jsonl, images/, masks/"),
    n_samples: int = typer.Option(64, "--n-samples"),
    seed: int = typer.Option(0, "--seed"),
    family: str = typer.Option("all", "--family", help="'all' or one organism task family"),
    per_group: bool = typer.Option(
        False,
        "--per-group",
        help="n_samples of each family, as notebooks 00, 03 and 04 draw them (load the manifest with the same "
        "n_samples and seed: every family's samples are kept in order)",
    ),
) -> None:
    """Write the samples data='organism' gives (same n_samples, seed, family) as a manifest with pixel masks."""
    from vtrlab.data.sources import export_organism

    try:
        path = export_organism(out, n_samples=n_samples, seed=seed, family=family, per_group=per_group)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))
