"""LLaVA-1.5 / organism adapter and the loader (tiny random models, CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vtrlab as vl
from vtrlab.models import loader
from vtrlab.models.base import KIND_IMAGE, KIND_SEPARATOR
from vtrlab.models.registry import adapter_for, supported_model_types
from vtrlab.models.vlm import VLM
from vtrlab.testing import tiny
from vtrlab.testing.families.llava import build_tiny_llava
from vtrlab.testing.pixels import check_pixel_boxes, gradient_image
from vtrlab.testing.probes import projector_io
from vtrlab.testing.proof import assert_layout_proven

pytestmark = pytest.mark.xdist_group("llava")


@pytest.fixture(scope="module")
def vlm():
    return tiny("llava")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, vlm):
    path = tmp_path_factory.mktemp("tiny-llava")
    vlm.model.save_pretrained(path)
    vlm.processor.save_pretrained(path)
    return path


def _tiny_variant(**kw) -> VLM:
    model, proc = build_tiny_llava(0, **kw)
    return VLM(model=model, processor=proc, adapter=adapter_for("llava"))


# --- modules ----------------------------------------------------------------------------------
def test_modules(vlm):
    m, a = vlm.model, vlm.adapter
    assert a.family == "llava" and "llava" in supported_model_types()
    assert list(vlm.lm_layers) == list(m.model.language_model.layers)
    tower_layers = [
        mod
        for name, mod in m.model.vision_tower.named_modules()
        if name.count(".") == name.count("layers.") + 1 and "encoder.layers." in name
    ]
    assert list(vlm.vision_layers) == tower_layers and len(tower_layers) == m.config.vision_config.num_hidden_layers
    assert a.lm_attention(vlm.lm_layers[0]) is m.model.language_model.layers[0].self_attn
    assert a.vision_attention(vlm.vision_layers[0]) is vlm.vision_layers[0].self_attn
    assert a.projector(m) is m.model.multi_modal_projector
    assert a.lm_head(m) is m.lm_head
    assert vlm.has_cls is True  # CLIP


def test_vision_feature_layer_is_the_layer_feeding_the_projector(vlm):
    """Oracle: the projector's input equals (minus [CLS]) the output of vision_layers[k]."""
    m, a = vlm.model, vlm.adapter
    batch = vlm.prepare([gradient_image(40, 40)], ["hi"])
    k = a.vision_feature_layer(m)
    layer_out, proj = projector_io(vlm, batch)
    torch.testing.assert_close(proj, layer_out[:, a.n_cls(m) :])
    assert k == len(vlm.vision_layers) + m.config.vision_feature_layer


# --- layout -----------------------------------------------------------------------------------
def test_counts_and_grid(vlm):
    batch = vlm.prepare([[gradient_image(72, 40), gradient_image(30, 50)]], ["which?"])
    lay = batch.layouts[0]
    g = vlm.model.config.vision_config.image_size // vlm.model.config.vision_config.patch_size
    assert lay.n_image_tokens == 2 * g * g
    assert lay.grid_shapes == {(0, 0): (g, g), (1, 0): (g, g)}
    assert (lay.tile == 0).all() and set(lay.kind) == {KIND_IMAGE}
    assert lay.image_sizes == [(72, 40), (30, 50)]
    tab = lay.table()
    assert list(tab.columns) == ["position", "kind", "image", "tile", "row", "col", "x0", "y0", "x1", "y1"]
    # image 0 comes first in the sequence, raster order inside each image
    first = tab[tab.image == 0]
    assert (np.diff(first.position) == 1).all() and (first.row * g + first.col == np.arange(g * g)).all()
    vis = lay.vision_table()
    assert set(vis.kind) == {"cls", "patch"} and len(vis) == 2 * (g * g + 1)
    assert (vis[vis.kind == "cls"].vpos == 0).all()


@pytest.mark.parametrize("do_pad", [False, True])
def test_pixel_boxes_match_pixel_values(do_pad):
    """Boxes proven against the processor's pixels: center crop (default) and pad-to-square."""
    v = _tiny_variant(do_pad=do_pad)
    images = [gradient_image(72, 40), [gradient_image(40, 90), gradient_image(48, 48)]]
    batch = v.prepare(images, ["one", "two"])
    n = check_pixel_boxes(v, batch, patch=8)
    assert n >= 20
    boxes = batch.layouts[0].table()
    if do_pad:  # 40x90 padded to 90x90: 25 px each side > one 22.5 px patch, so columns 0 and 3 are pure padding
        tall = batch.layouts[1].table().query("image == 0")
        assert tall[tall.col.isin([0, 3])][["x0", "y0", "x1", "y1"]].isna().all().all()
        assert not tall[tall.col.isin([1, 2])][["x0", "y0"]].isna().any().any()
        assert np.nanmin(boxes.y0) == 0 and np.nanmax(boxes.y1) == 40
    else:  # shortest-edge resize + center crop cuts the sides
        assert boxes.x0.min() > 0 and boxes.x1.max() < 72 and boxes.y0.min() == 0 and boxes.y1.max() == 40


def test_full_strategy_keeps_cls_as_separator_token():
    """vision_feature_select_strategy='full': the [CLS] feature also enters the LM; the layout marks it."""
    v = _tiny_variant(strategy="full")
    batch = v.prepare([gradient_image(64, 40)], ["q"])
    lay = batch.layouts[0]
    assert lay.kind[0] == KIND_SEPARATOR and (lay.kind[1:] == KIND_IMAGE).all() and lay.n_image_tokens == 16
    proj = v.adapter.projector(v.model)
    h = proj.register_forward_hook(
        lambda m, a, out: (
            torch.arange(out.numel() // out.shape[-1], dtype=out.dtype)[:, None]
            .expand(-1, out.shape[-1])
            .reshape(out.shape)
            .clone()
        )
    )
    try:
        emb = v.adapter.decoder_inputs(v.model, batch.inputs)["inputs_embeds"][0, :, 0]
    finally:
        h.remove()
    assert emb[lay.positions[0]] == 0  # the [CLS] row
    assert torch.equal(emb[lay.image_positions], torch.arange(1, 17, dtype=emb.dtype))


def test_proof_catches_a_wrong_layout(vlm):
    """The proof is not vacuous: a transposed grid or a shifted block is detected."""
    batch = vlm.prepare([gradient_image(72, 40)], ["q"])
    assert assert_layout_proven(vlm, batch) == 16
    lay = batch.layouts[0]
    lay.row, lay.col = lay.col.copy(), lay.row.copy()
    with pytest.raises(AssertionError, match="another feature"):
        assert_layout_proven(vlm, batch)
    lay.row, lay.col = lay.col.copy(), lay.row.copy()
    lay.positions = lay.positions + 1
    with pytest.raises(AssertionError, match="disagree"):
        assert_layout_proven(vlm, batch)


def test_prepare_errors(vlm):
    with pytest.raises(ValueError, match="image entries for 1 prompts"):
        vlm.prepare([gradient_image(8, 8), gradient_image(8, 8)], ["only one"])
    with pytest.raises(FileNotFoundError, match="sample 0, image 0: no image file at 'cat.png'"):
        vlm.prepare(["cat.png"], ["q"])
    with pytest.raises(TypeError, match="sample 0, image 0: got int"):
        vlm.prepare([3], ["q"])


# --- loader -----------------------------------------------------------------------------------
def test_load_local_path_matches_the_built_model(vlm, saved):
    loaded = vl.load(str(saved), device="cpu")
    assert loaded.family == "llava" and loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    images, prompts = [gradient_image(72, 40)], ["What is it?"]
    a, b = vlm.prepare(images, prompts), loaded.prepare(images, prompts)
    assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])
    assert (a.layouts[0].table().fillna(-1) == b.layouts[0].table().fillna(-1)).all().all()
    with torch.no_grad():
        torch.testing.assert_close(vlm.model(**a.inputs).logits, loaded.model(**b.inputs).logits)


def test_load_organism_env_override(saved, monkeypatch):
    monkeypatch.setenv("VTRLAB_ORGANISM", str(saved))
    v = vl.load("organism", device="cpu", dtype="bfloat16")
    assert v.family == "llava" and v.dtype == torch.bfloat16


def test_load_organism_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("VTRLAB_ORGANISM", str(tmp_path / "nowhere"))
    with pytest.raises(loader.ModelLoadError, match="VTRLAB_ORGANISM"):
        vl.load("organism")


def test_load_unsupported_architecture_lists_families(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path
    )
    with pytest.raises(ValueError, match=r"unsupported architecture: model_type 'bert'.*llava \(llava\)"):
        vl.load(str(tmp_path))


def test_load_hub_unreachable_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    with pytest.raises(loader.ModelLoadError) as err:
        vl.load("someone/not-a-cached-model-xyz")
    msg = str(err.value)
    assert "\n" not in msg and "cannot be reached" in msg and "local path" in msg


def test_load_bad_arguments(saved, tmp_path):
    with pytest.raises(loader.ModelLoadError, match="no config.json"):
        vl.load(str(tmp_path))
    with pytest.raises(ValueError, match="dtype 'float8'"):
        vl.load(str(saved), device="cpu", dtype="float8")


def test_organism_layout_proven_when_present():
    """The organism shipped in the repo (or $VTRLAB_ORGANISM): its own processor, template and
    tokenizer pass the same proof as the tiny LLaVA."""
    v = vl.load("organism", device="cpu")
    images = [gradient_image(100, 60), gradient_image(50, 90)]
    batch = v.prepare(images, ["what color is the circle?", "how many squares?"])
    assert assert_layout_proven(v, batch, [1, 1]) == 2 * v.model.config.image_seq_length
    assert check_pixel_boxes(v, batch, patch=v.model.config.vision_config.patch_size) > 0
    for lay in batch.layouts:
        assert len(lay.question_positions) > 0


def test_load_cached_hub_id_offline(saved, tmp_path, monkeypatch):
    """A hub id already in the cache loads without the hub (no retries against an unreachable host)."""
    import shutil

    from huggingface_hub import constants

    snap = tmp_path / "models--someone--tiny-llava" / "snapshots" / ("0" * 40)
    shutil.copytree(saved, snap)
    (tmp_path / "models--someone--tiny-llava" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-llava" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    v = vl.load("someone/tiny-llava", device="cpu", cache_dir=str(tmp_path))
    assert v.family == "llava" and v.name == "someone/tiny-llava"


def test_load_with_device_map(vlm, saved):
    """device_map goes to from_pretrained (accelerate); here onto the CPU, same outputs."""
    v = vl.load(str(saved), device_map="cpu")
    assert v.device.type == "cpu"
    batch = v.prepare([gradient_image(40, 40)], ["q"])
    with torch.no_grad():
        torch.testing.assert_close(v.model(**batch.inputs).logits, vlm.model(**batch.inputs).logits)
