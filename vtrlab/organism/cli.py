"""`vtrlab organism ...`: train and evaluate the embedded model organism.

Mounted by vtrlab/cli.py as ``app.add_typer(organism_app, name="organism")``.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Train and evaluate the embedded model organism (tiny LLaVA on synthetic VQA).", no_args_is_help=True
)


@app.command()
def train(
    out: Path = typer.Option(..., help="folder to write the trained bundle to (replaced atomically)"),
    resume: bool = typer.Option(False, help="continue from the checkpoint in --ckpt-dir"),
    finish: bool = typer.Option(
        False,
        help="if the budget runs out in the instruct stage, stop training there "
        "(recorded as cut short), evaluate and save instead of checkpointing",
    ),
    ckpt_dir: Path = typer.Option(None, help="checkpoint folder (default: OUT.ckpt beside OUT)"),
    device: str = typer.Option("cuda", help="torch device, e.g. cuda or cpu"),
    seed: int = typer.Option(None, help="model init and batch order"),
    max_minutes: float = typer.Option(None, help="wall-time budget of this call; then checkpoint and stop"),
    n_train_per_family: int = typer.Option(None, help="samples per family, clip/text/align stages (data seed 1)"),
    n_instruct_per_family: int = typer.Option(
        None, help="fresh instruct samples per call for a family of weight 1 (scaled by weight; 0: reuse stage-1 set)"
    ),
    clip_steps: int = typer.Option(None, help="micro-CLIP stage: contrastive + dense per-patch targets"),
    text_steps: int = typer.Option(None, help="LM on text alone"),
    align_steps: int = typer.Option(None, help="LLaVA stage 1: projector on image -> caption"),
    instruct_steps: int = typer.Option(None, help="LLaVA stage 2: projector + LM on the VQA families"),
    lr_lm: float = typer.Option(None, help="learning rate of projector + LM in the instruct stage"),
    lr_tower_instruct: float = typer.Option(None, help="tower learning rate in the instruct stage (0: frozen)"),
    batch_size: int = typer.Option(None, help="samples per step"),
    n_val_per_family: int = typer.Option(None, help="validation samples per family (data seed 2)"),
    eval_n: int = typer.Option(None, help="held-out samples per family evaluated at the end (0: none)"),
    workers: int = typer.Option(0, help="processes rendering the data (0: all cores but one)"),
    family_weights: str = typer.Option("", help="sampling weights, e.g. count=1.5,relation=2,reading=1.5"),
) -> None:
    """Train the organism (micro-CLIP, text LM, projector alignment, instruction tuning), evaluate, save.

    Each call stops itself after --max-minutes, leaving a checkpoint; run it again with --resume."""
    import sys

    from vtrlab.organism.train import parse_family_weights, train_organism

    # recipe options left out take TrainConfig's defaults (one place for the shipped recipe)
    opts = dict(
        device=device,
        seed=seed,
        max_minutes=max_minutes,
        n_train_per_family=n_train_per_family,
        n_instruct_per_family=n_instruct_per_family,
        clip_steps=clip_steps,
        text_steps=text_steps,
        align_steps=align_steps,
        instruct_steps=instruct_steps,
        lr_lm=lr_lm,
        eval_n=eval_n,
        batch_size=batch_size,
        lr_tower_instruct=lr_tower_instruct,
        n_val_per_family=n_val_per_family,
    )
    if resume:  # the checkpoint's recipe stands; only this call's budget and device change
        opts = dict(device=device, max_minutes=max_minutes)
    opts = {k: v for k, v in opts.items() if v is not None}
    if workers > 0:
        opts["workers"] = workers
    if family_weights:
        try:
            opts["family_weights"] = parse_family_weights(family_weights)
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
    try:
        record = train_organism(
            out,
            resume=resume,
            ckpt_dir=ckpt_dir,
            finish=finish,
            command="vtrlab organism train " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["train"] else sys.argv[1:]),
            **opts,
        )
    except FileNotFoundError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if record.get("finished"):
        typer.echo(f"saved to {out}; validation {record['val']}")
    else:
        typer.echo(f"not finished: stopped at {record['calls'][-1]['stopped_at']}; run again with --resume")
        raise typer.Exit(3)


@app.command("eval")
def evaluate_cmd(
    path: Path = typer.Argument(Path("data/models/organism"), help="organism bundle folder"),
    n: int = typer.Option(500, help="held-out samples per family (data seed 0)"),
    seed: int = typer.Option(0, help="data seed (training used 1 and 2)"),
    device: str = typer.Option("cpu", help="torch device"),
    batch_size: int = typer.Option(32, help="samples per generate call"),
    out_json: Path = typer.Option(None, help="also write the result JSON here"),
) -> None:
    """Greedy exact-match accuracy per family beside the no-image (blank picture) baseline."""
    from vtrlab.organism.evaluate import evaluate_bundle, format_table

    if not (path / "config.json").is_file():
        typer.echo(f"error: no organism bundle at {path} (expected config.json there)", err=True)
        raise typer.Exit(2)
    res = evaluate_bundle(path, n=n, seed=seed, device=device, batch_size=batch_size, out_json=out_json)
    typer.echo(format_table(res))


@app.command("random")
def random_cmd(out: Path = typer.Option(Path("/tmp/vtrlab-organism-random"), help="where to save")) -> None:
    """Save a random-init organism (same architecture and processor) for tests and plumbing."""
    from vtrlab.organism.build import save_random

    typer.echo(str(save_random(out)))


@app.command()
def realism(
    path: Path = typer.Argument(Path("data/models/organism"), help="organism bundle folder"),
    n: int = typer.Option(120, help="held-out samples (data seed 0, families cycled)"),
    device: str = typer.Option("cpu", help="torch device"),
) -> None:
    """Measure the realism table (attention shares, raster order, high-norm tokens, ...) -> realism.json."""
    import torch

    from vtrlab.organism.realism import write_realism

    if not (path / "config.json").is_file():
        typer.echo(f"error: no organism bundle at {path} (expected config.json there)", err=True)
        raise typer.Exit(2)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    typer.echo(str(write_realism(path, n=n, device=device)))


@app.command()
def card(
    path: Path = typer.Argument(Path("data/models/organism"), help="organism bundle folder"),
    readme: Path = typer.Option(
        None, help="also regenerate this README's organism section (between <!-- organism-summary:begin/end -->)"
    ),
) -> None:
    """Render the bundle's model card (README.md) from its template and records."""
    from vtrlab.organism.card import write_card

    try:
        typer.echo(str(write_card(path, readme=readme)))
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
