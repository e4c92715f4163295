"""vtrlab.plots: byte-identical output, Type 42 fonts, paper widths, and what the helpers draw."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import vtrlab.plots as vp  # noqa: E402
from vtrlab.models.base import ImageLayout  # noqa: E402

# One figure using every helper and text; drawn in fresh interpreters with different hash seeds.
SCRIPT = """
import sys, numpy as np, pandas as pd, matplotlib
matplotlib.use("Agg")
import vtrlab.plots as vp
rng = np.random.default_rng(0)
fig, axes = vp.figure("double", ncols=3)
vp.heatmap_over_image(axes[0], rng.random((40, 60, 3)), rng.random((4, 6)))
df = pd.DataFrame({"layer": np.repeat(np.arange(6), 8), "value": rng.random(48), "method": ["a", "b"] * 24})
vp.layer_curve(axes[1], df, hue="method")
vp.layer_matrix(axes[2], rng.standard_normal((5, 5)), annotate=True)
axes[1].set_title("Attention µ ≥ 0.5")
from vtrlab.runner import save_figure
save_figure(fig, "all", directory=sys.argv[1])
"""


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        out.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


@pytest.fixture(scope="module")
def two_renders(tmp_path_factory):
    dirs = []
    for seed in ("1", "2"):
        out = tmp_path_factory.mktemp(f"render{seed}")
        subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        dirs.append(out)
    return dirs


@pytest.mark.parametrize("suffix", ["pdf", "png"])
def test_same_figure_same_bytes_across_processes(two_renders, suffix):
    a, b = (d / f"all.{suffix}" for d in two_renders)
    assert a.read_bytes() == b.read_bytes()


def test_pdf_fonts_are_type42_and_metadata_fixed(two_renders):
    pdf = (two_renders[0] / "all.pdf").read_bytes()
    assert b"/Subtype /TrueType" in pdf or b"/Subtype /CIDFontType2" in pdf
    assert b"/Type3" not in pdf  # no Type 3 fonts anywhere
    assert b"/CreationDate" not in pdf and b"/ModDate" not in pdf
    assert b"/Producer (vtrlab)" in pdf and b"Matplotlib" not in pdf


def test_png_has_no_software_or_time_and_exact_width(two_renders):
    chunks = png_chunks((two_renders[0] / "all.png").read_bytes())
    kinds = [k for k, _ in chunks]
    assert b"tIME" not in kinds
    texts = [body for k, body in chunks if k in (b"tEXt", b"iTXt", b"zTXt")]
    assert not any(t.startswith(b"Software") for t in texts)
    width, height = struct.unpack(">II", dict(chunks)[b"IHDR"][:8])
    assert width == round(vp.DOUBLE_COLUMN * vp.DPI)


def test_style_settings():
    assert matplotlib.rcParams["pdf.fonttype"] == 42 and matplotlib.rcParams["ps.fonttype"] == 42
    assert matplotlib.rcParams["svg.hashsalt"] == "vtrlab"
    fig, _ = vp.figure("single")
    assert fig.get_figwidth() == pytest.approx(3.25)
    fig2, _ = vp.figure("double", nrows=2)
    assert fig2.get_figwidth() == pytest.approx(6.75)
    with pytest.raises(ValueError, match="'single', 'double'"):
        vp.figure("wide")
    plt.close("all")


def test_save_figure_goes_to_run_figure_dir(tmp_path, monkeypatch):
    from vtrlab.runner import save_figure

    monkeypatch.setenv("VTRLAB_FIGURE_DIR", str(tmp_path / "figs"))
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    paths = save_figure(fig, "curve", close=True)
    assert [p.name for p in paths] == ["curve.pdf", "curve.png"] and all(p.parent == tmp_path / "figs" for p in paths)
    assert not list((tmp_path / "figs").glob(".*"))  # temp files renamed away
    for bad in ("a/b", "x.pdf", "", "../up"):
        with pytest.raises(ValueError, match="plain file stem"):
            save_figure(fig, bad)
    # the bytes on disk are exactly what plots renders (byte-stable metadata)
    import io

    for p in paths:
        buf = io.BytesIO()
        vp.write_figure(fig, buf, p.suffix[1:])
        assert buf.getvalue() == p.read_bytes()


def test_heatmap_grid_cells_cover_the_picture():
    fig, ax = plt.subplots()
    values = np.array([[0.0, 1.0, 2.0], [3.0, np.nan, 5.0]])
    coll = vp.heatmap_over_image(ax, np.zeros((20, 30, 3)), values, colorbar=False)
    np.testing.assert_array_equal(coll.get_array(), [0, 1, 2, 3, 5])  # NaN cell not drawn
    boxes = [
        (p.vertices[:, 0].min(), p.vertices[:, 1].min(), p.vertices[:, 0].max(), p.vertices[:, 1].max())
        for p in coll.get_paths()
    ]
    assert boxes[0] == (0, 0, 10, 10) and boxes[4] == (20, 10, 30, 20)
    assert ax.get_xlim() == (0, 30) and ax.get_ylim() == (20, 0)
    plt.close(fig)


def _layout() -> ImageLayout:
    # 2x2 grid on tile 0 (whole 40x40 image), plus a separator token and a 1x2 grid on tile 1
    kinds = np.array(["image"] * 4 + ["separator"] + ["image"] * 2)
    tile = np.array([0, 0, 0, 0, -1, 1, 1])
    row = np.array([0, 0, 1, 1, -1, 0, 0])
    col = np.array([0, 1, 0, 1, -1, 0, 1])
    x0 = np.array([0, 20, 0, 20, np.nan, 0, 10.0])
    y0 = np.array([0, 0, 20, 20, np.nan, 0, 0.0])
    return ImageLayout(
        positions=np.arange(5, 12),
        kind=kinds,
        image=np.zeros(7, int),
        tile=tile,
        row=row,
        col=col,
        x0=x0,
        y0=y0,
        x1=np.where(tile == 1, x0 + 10, x0 + 20),
        y1=np.where(tile == 1, y0 + 20, y0 + 20),
        seq_len=16,
        valid_positions=np.arange(16),
        question_positions=np.arange(12, 16),
        image_sizes=[(40, 40)],
        grid_shapes={(0, 0): (2, 2), (0, 1): (1, 2)},
    )


def test_heatmap_with_layout_uses_token_boxes():
    layout = _layout()
    values = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 20.0])  # one per image token
    fig, ax = plt.subplots()
    coll = vp.heatmap_over_image(ax, np.zeros((40, 40)), values, layout=layout, colorbar=False)
    np.testing.assert_array_equal(coll.get_array(), [1, 2, 3, 4])
    # same picture as the grid path fed with layout.to_grid (oracle for the base tile)
    fig2, ax2 = plt.subplots()
    grid = vp.heatmap_over_image(ax2, np.zeros((40, 40)), layout.to_grid(values), colorbar=False)
    np.testing.assert_array_equal(coll.get_array(), grid.get_array())
    for p, q in zip(coll.get_paths(), grid.get_paths()):
        np.testing.assert_allclose(np.sort(p.vertices[:4], axis=0), np.sort(q.vertices[:4], axis=0))
    crop = vp.heatmap_over_image(ax, np.zeros((40, 40)), values, layout=layout, tile=1, colorbar=False)
    np.testing.assert_array_equal(crop.get_array(), [10, 20])
    assert crop.get_paths()[1].vertices[:, 0].max() == 20
    with pytest.raises(ValueError, match="6 image tokens"):
        vp.heatmap_over_image(ax, np.zeros((40, 40)), values[:3], layout=layout)
    with pytest.raises(ValueError, match=r"\(rows, cols\) grid"):
        vp.heatmap_over_image(ax, np.zeros((40, 40)), values)
    plt.close("all")


def test_layer_curve_draws_group_means():
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"layer": np.repeat(np.arange(5), 10), "value": rng.random(50)})
    fig, ax = plt.subplots()
    vp.layer_curve(ax, df)
    x, y = ax.lines[0].get_data()
    np.testing.assert_allclose(y, df.groupby("layer")["value"].mean().to_numpy())
    band = ax.collections[0].get_paths()[0].vertices
    fig2, ax2 = plt.subplots()
    vp.layer_curve(ax2, df)
    np.testing.assert_array_equal(band, ax2.collections[0].get_paths()[0].vertices)  # fixed bootstrap seed
    with pytest.raises(ValueError, match=r"columns \['score'\] not in data"):
        vp.layer_curve(ax, df, y="score")
    plt.close("all")


def test_layer_matrix_values_and_symmetric_limits():
    m = np.array([[1.0, -0.5], [0.25, -2.0]])
    fig, ax = plt.subplots()
    im = vp.layer_matrix(ax, m, labels=["lm.0", "lm.1"], colorbar=False)
    np.testing.assert_array_equal(im.get_array(), m)
    assert im.get_clim() == (-2.0, 2.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["lm.0", "lm.1"]
    with pytest.raises(ValueError, match="3 labels"):
        vp.layer_matrix(ax, m, labels=["a", "b", "c"])
    plt.close("all")


def test_heatmap_outline_maps_colours_to_edges():
    fig, ax = plt.subplots()
    coll = vp.heatmap_over_image(
        ax,
        np.zeros((8, 8)),
        np.array([[1.0, np.nan], [np.nan, 0.0]]),
        outline=True,
        colorbar=False,
        cmap="viridis",
        vmin=0,
        vmax=1,
    )
    fig.canvas.draw()
    np.testing.assert_allclose(coll.get_facecolor()[:, 3], 0)  # no fill
    cmap = matplotlib.colormaps["viridis"]
    np.testing.assert_allclose(coll.get_edgecolor(), [cmap(1.0), cmap(0.0)])
    plt.close(fig)
