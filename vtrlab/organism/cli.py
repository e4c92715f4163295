"""`vtrlab organism ...`: train and evaluate the embedded model organism.

Mounted by vtrlab/cli.py as ``app.add_typer(organism_app, name="organism")``.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Train and evaluate the embedded model organism (tiny LLaVA on synthetic VQA).",
                  no_args_is_help=True)


@app.command()
def train(
    out: Path = typer.Option(..., help="folder to write the trained bundle to (replaced atomically)"),
    device: str = typer.Option("cuda", help="torch device, e.g. cuda or cpu"),
    seed: int = typer.Option(0, help="model init and batch order"),
    image_first: bool = typer.Option(False, help="chat template: image before the question (default: after)"),
    init_from: str = typer.Option("", help="continue from a saved organism instead of random init"),
    tower_steps: int = typer.Option(2000, help="steps of each dense tower round"),
    tower_rounds: int = typer.Option(2, help="tower rounds (cosine warm restarts)"),
    frozen_steps: int = typer.Option(3000, help="answer steps with the tower frozen"),
    joint_steps: int = typer.Option(8000, help="answer steps with everything training"),
    aux_weight: float = typer.Option(1.0, help="weight of the dense tower targets in the joint stage"),
    lr_lm: float = typer.Option(1e-3, help="learning rate of projector + LM"),
    lr_tower_joint: float = typer.Option(2e-4, help="learning rate of the tower in the joint stage"),
    n_train_per_family: int = typer.Option(24000, help="training samples per family (data seed 1)"),
    max_minutes: float = typer.Option(9.0, help="wall-time budget; later stages are fitted into it"),
    eval_n: int = typer.Option(500, help="held-out samples per family evaluated at the end (0: none)"),
    workers: int = typer.Option(0, help="processes rendering the data (0: all cores but one)"),
    family_weights: str = typer.Option("", help="sampling weights, e.g. count=1.5,relation=2,reading=1.5"),
) -> None:
    """Train the organism from scratch (or continue one), evaluate it, save the bundle."""
    from vtrlab.organism.train import train_organism

    opts = dict(device=device, seed=seed, image_first=image_first, init_from=init_from, tower_steps=tower_steps,
                tower_rounds=tower_rounds, frozen_steps=frozen_steps, joint_steps=joint_steps,
                aux_weight=aux_weight, lr_lm=lr_lm, lr_tower_joint=lr_tower_joint,
                n_train_per_family=n_train_per_family, max_minutes=max_minutes, eval_n=eval_n)
    if workers > 0:
        opts["workers"] = workers
    if family_weights:
        from vtrlab.organism.train import parse_family_weights

        try:
            opts["family_weights"] = parse_family_weights(family_weights)
        except ValueError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
    record = train_organism(out, **opts)
    typer.echo(f"saved to {out}; validation {record['val']}")


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
