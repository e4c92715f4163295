"""`vtrlab data check` / `vtrlab data export-organism`."""

from __future__ import annotations

from typer.testing import CliRunner

from vtrlab.cli import app
from vtrlab.data.sources import load_data


def test_export_then_check(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "export-organism", str(tmp_path / "org"), "--n-samples", "3", "--seed", "2"])
    assert res.exit_code == 0, res.output
    exported = load_data(tmp_path / "org" / "manifest.jsonl")
    assert [r.id for r in exported] == [r.id for r in load_data("organism", n_samples=3, seed=2)]
    res = runner.invoke(app, ["data", "check", str(tmp_path / "org" / "manifest.jsonl")])
    assert res.exit_code == 0, res.output
    assert "3 samples: 3 with answers, 3 with ground truth" in res.output


def test_bad_data_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["data", "check", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "missing.jsonl" in res.output
    res = CliRunner().invoke(app, ["data", "export-organism", str(tmp_path / "o"), "--family", "bogus"])
    assert res.exit_code == 2 and "bogus" in res.output


def test_export_per_group_gives_the_notebooks_per_family_draw(tmp_path):
    res = CliRunner().invoke(
        app, ["data", "export-organism", str(tmp_path / "pg"), "--n-samples", "2", "--seed", "1", "--per-group"]
    )
    assert res.exit_code == 0, res.output
    exported = load_data(tmp_path / "pg" / "manifest.jsonl", n_samples=2, seed=1, per_group=True)
    assert [r.id for r in exported] == [r.id for r in load_data("organism", n_samples=2, seed=1, per_group=True)]
