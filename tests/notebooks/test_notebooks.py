"""Every notebooks/*.ipynb: committed clean, one typed parameters cell, runs on CPU with smoke parameters.

Smoke parameters come from the notebook metadata `metadata["vtrlab"]["smoke"]`; `device` is
forced to "cpu" where the notebook has it. Runs go to a temp project root, so the repository's
figures/ and runs/ are untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vtrlab.runner.params import read_parameters
from vtrlab.runner.provenance import sha256
from vtrlab.runner.run import prepare_job, run_job

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
ids = [nb.stem for nb in NOTEBOOKS]


def _cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text(encoding="utf-8"))["cells"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_committed_without_outputs(nb):
    dirty = [i for i, c in enumerate(_cells(nb))
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{nb.name}: code cells {dirty} carry outputs or execution counts; strip them before committing"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_one_typed_parameters_cell_with_help_and_smoke(nb):
    spec = read_parameters(nb)  # exactly one `parameters` cell, every line `name: type = default`
    assert len(spec.parameters) > 0, f"{nb.name}: the parameters cell defines nothing"
    missing = [p.name for p in spec if not p.help]
    assert not missing, f"{nb.name}: parameters without a help comment: {missing}"
    meta = json.loads(nb.read_text(encoding="utf-8"))["metadata"]
    smoke = meta.get("vtrlab", {}).get("smoke")
    assert isinstance(smoke, dict), f'{nb.name}: metadata["vtrlab"]["smoke"] (a dict of smoke parameters) is missing'
    spec.resolve(smoke)  # smoke values are valid parameters of this notebook


@pytest.fixture(scope="session")
def organism_env():
    """Until data/models/organism is trained, notebooks use the random-init organism."""
    if os.environ.get("VTRLAB_ORGANISM") or (REPO / "data/models/organism/config.json").is_file():
        return {}
    random = Path("/tmp/vtrlab-organism-random")
    if not (random / "config.json").is_file():
        from vtrlab.organism import save_random

        save_random(random)
    return {"VTRLAB_ORGANISM": str(random)}


@pytest.mark.notebooks
@pytest.mark.xdist_group("notebooks")
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=ids)
def test_runs_with_smoke_parameters_on_cpu(nb, tmp_path, organism_env, monkeypatch):
    for key, value in organism_env.items():
        monkeypatch.setenv(key, value)
    spec = read_parameters(nb)
    smoke = dict(json.loads(nb.read_text(encoding="utf-8"))["metadata"].get("vtrlab", {}).get("smoke", {}))
    if "device" in spec:
        smoke["device"] = "cpu"
    result = run_job(prepare_job(nb, smoke, spec=spec), tmp_path)
    assert result.status == "ok", result.line()
    manifest_path = tmp_path / "figures" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    published = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "figures" / nb.stem).glob("*.*"))
    assert sorted(manifest) == published
    for key, record in manifest.items():
        assert record["sha256"] == sha256(tmp_path / key) and record["notebook"] == nb.stem
