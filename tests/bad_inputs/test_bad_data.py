"""Bad inputs to the data side: synthetic tasks, image manifests and folders, the trained selector.

Defect 10 of issue 15: `generate(2, seed=1.5)` silently used seed 1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from bad_cases import Case, params, run_case
from PIL import Image

from vtrlab.data.manifest import read_image_folder, read_manifest, write_manifest
from vtrlab.data.synthetic import FAMILIES, generate
from vtrlab.models.loader import organism_path
from vtrlab.recon.selector import Selector, SelectorConfig

SELECTOR = organism_path() / "selector"


def G(*args, **kw):
    return lambda ctx: generate(*args, **kw)


def _tree(files: dict[str, bytes | str | None]):
    """A folder with `files` (None = a real PNG) -> its path."""

    def make(ctx) -> Path:
        root = ctx / "data"
        root.mkdir(exist_ok=True)
        for name, data in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                Image.new("RGB", (8, 8)).save(path)
            else:
                path.write_bytes(data.encode() if isinstance(data, str) else data)
        return root

    return make


def M(files, name="manifest.jsonl"):
    maker = _tree(files)
    return lambda ctx: read_manifest(maker(ctx) / name)


def F(files, folder="."):
    maker = _tree(files)
    return lambda ctx: read_image_folder(maker(ctx) / folder)


def S(edit):
    def call(ctx):
        folder = ctx / "selector"
        shutil.copytree(SELECTOR, folder)
        edit(folder)
        return Selector.load(folder)

    return call


def _config(change):
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))

    return edit


def _write(name, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _set(**kw):
    return _config(lambda cfg: cfg.update(kw))


def _pop(key):
    return _config(lambda cfg: cfg.pop(key))


def n_samples(n):
    return lambda out: len(out) == n


CASES = [
    # synthetic tasks
    Case("generate_seed_float", G(2, 1.5), TypeError, ("seed", "1.5")),
    Case("generate_seed_integral_float", G(2, 1.0), TypeError, ("seed", "1.0")),
    Case("generate_seed_bool", G(2, True), TypeError, ("seed", "True")),
    Case("generate_seed_str", G(2, "1"), TypeError, ("seed", "'1'")),
    Case("generate_seed_none", G(2, None), TypeError, ("seed", "None")),
    Case("generate_seed_negative", G(2, -1), ValueError, ("seed", "-1")),
    Case("generate_n_float", G(2.0, 0), TypeError, ("n", "2.0")),
    Case("generate_n_bool", G(True, 0), TypeError, ("n", "True")),
    Case("generate_n_negative", G(-1, 0), ValueError, ("n", "-1")),
    Case("generate_n_str", G("2", 0), TypeError, ("n", "'2'")),
    Case("generate_family_unknown", G(2, 0, family="colour"), ValueError, ("'colour'", "color")),
    Case("generate_family_empty_list", G(2, 0, family=[]), ValueError, ("empty",)),
    Case("generate_family_list_bad", G(2, 0, family=["color", "size"]), ValueError, ("'size'",)),
    Case("generate_grid_zero", G(2, 0, grid=0), ValueError, ("grid", "0")),
    Case("generate_grid_float", G(2, 0, grid=1.5), TypeError, ("grid", "1.5")),
    Case("generate_grid_not_dividing", G(2, 0, grid=7), ValueError, ("grid=7",)),
    Case("generate_image_size_zero", G(2, 0, image_size=0), ValueError, ("image_size", "0")),
    Case("generate_image_size_float", G(2, 0, image_size=128.0), TypeError, ("image_size", "128.0")),
    Case("generate_ok_zero", G(0, 0), None, check=n_samples(0)),
    Case("generate_ok_numpy_ints", G(np.int64(2), np.int32(3)), None, check=n_samples(2)),
    Case(
        "generate_ok_every_family",
        G(len(FAMILIES), 1),
        None,
        check=lambda out: sorted(s.family for s in out) == sorted(FAMILIES),
    ),
    Case(
        "generate_ok_deterministic",
        lambda ctx: [s.question for s in generate(3, 5)] == [s.question for s in generate(3, 5)],
        None,
        check=bool,
    ),
    # manifests
    Case("manifest_missing", lambda ctx: read_manifest(ctx / "nope.jsonl"), FileNotFoundError, ("nope.jsonl",)),
    Case("manifest_bad_json", M({"manifest.jsonl": '{"image": "a.png"\n'}), ValueError, ("manifest.jsonl:1",)),
    Case("manifest_not_object", M({"manifest.jsonl": "[1, 2]\n"}), ValueError, ("manifest.jsonl:1", "'image'")),
    Case("manifest_no_image_key", M({"manifest.jsonl": '{"question": "q"}\n'}), ValueError, (":1", "'image'")),
    Case(
        "manifest_image_missing",
        M({"manifest.jsonl": '{"image": "gone.png"}\n'}),
        FileNotFoundError,
        ("gone.png", ":1"),
    ),
    Case(
        "manifest_second_line_bad",
        M({"a.png": None, "manifest.jsonl": '{"image": "a.png"}\n{oops\n'}),
        ValueError,
        ("manifest.jsonl:2",),
    ),
    Case(
        "manifest_ok",
        M({"a.png": None, "manifest.jsonl": '{"image": "a.png", "question": "q", "k": 1}\n\n'}),
        None,
        check=lambda r: len(r) == 1 and r[0].question == "q" and r[0].meta == {"k": 1},
    ),
    Case("folder_missing", lambda ctx: read_image_folder(ctx / "nope"), NotADirectoryError, ("nope",)),
    Case("folder_empty", F({"notes.txt": "x"}), ValueError, ("no images", ".png")),
    Case("folder_a_file", F({"a.png": None}, folder="a.png"), NotADirectoryError, ("a.png",)),
    Case(
        "folder_ok",
        F({"b.png": None, "a.jpg": None, "c.txt": "x"}),
        None,
        check=lambda r: [p.path.name for p in r] == ["a.jpg", "b.png"],
    ),
    Case(
        "write_manifest_roundtrip",
        lambda ctx: read_manifest(write_manifest(generate(2, 0), ctx / "out")),
        None,
        check=lambda r: len(r) == 2 and r[0].image.size == (128, 128),
    ),
    # the selector on disk
    Case("selector_missing", lambda ctx: Selector.load(ctx / "none"), FileNotFoundError, ("none", "config.json")),
    Case("selector_config_truncated", S(_write("config.json", b'{"feature_dim": ')), ValueError, ("config.json",)),
    Case("selector_config_unknown_field", S(_set(colour=1)), ValueError, ("config.json", "colour")),
    Case("selector_config_bad_p", S(_set(p=1.5)), ValueError, ("config.json", "p=1.5")),
    Case("selector_config_bad_tau", S(_set(tau=0)), ValueError, ("tau=0",)),
    Case("selector_config_missing_dim", S(_pop("feature_dim")), ValueError, ("config.json", "feature_dim")),
    Case("selector_weights_truncated", S(_write("model.safetensors", b"\x10\x00")), ValueError, ("model.safetensors",)),
    Case(
        "selector_weights_other_config",
        S(_config(lambda cfg: cfg.update(d_model=cfg["d_model"] * 2))),
        ValueError,
        ("model.safetensors",),
    ),
    Case("selector_ok", S(lambda folder: None), None, check=lambda sel: sel.config.feature_dim > 0),
    Case(
        "selector_config_heads",
        lambda ctx: SelectorConfig(feature_dim=8, d_model=30, n_heads=4),
        ValueError,
        ("d_model=30",),
    ),
    Case("selector_config_dim_zero", lambda ctx: SelectorConfig(feature_dim=0), ValueError, ("0",)),
]


@params(CASES)
def test_bad_data(case, tmp_path):
    run_case(case, tmp_path)
