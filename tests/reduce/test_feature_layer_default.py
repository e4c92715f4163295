"""Tower methods read the layer the model's projector reads unless told otherwise.

The official VisionZip / PruMerge / FlowCut code hard-codes LLaVA-1.5's feature layer (-2). The organism
projects its last vision layer: reading -2 there would hand the projector features it was never trained on
(FlowCut at keep=1.0 then moved the logits by ~12)."""

import pytest
import torch

import vtrlab as vl
import vtrlab.reduce as R
from vtrlab.data.synthetic import generate
from vtrlab.reduce.methods._vision import feature_layer_or


@pytest.fixture(scope="module")
def organism_batch():
    vlm = vl.load("organism")
    ss = generate(3, seed=21)
    return vlm, vlm.prepare([s.image for s in ss], [s.question for s in ss])


def test_default_is_the_models_feature_layer(organism_batch):
    vlm, _ = organism_batch
    fl = int(vlm.adapter.vision_feature_layer(vlm.model))
    assert fl == len(vlm.vision_layers) - 1  # the organism projects its last layer
    for name, param in (("visionzip", "vision_layer"), ("prumerge", "feature_layer"), ("flowcut", "feature_layer")):
        m = R.get(name)
        assert m.params[param] is None
        assert feature_layer_or(vlm, m.params[param], name, param) == fl
    assert feature_layer_or(vlm, -2, "x", "p") == -2
    with pytest.raises(TypeError, match=r"feature_layer='2'.*None \(the model's feature layer\) or an int"):
        feature_layer_or(vlm, "2", "flowcut", "feature_layer")


@pytest.mark.parametrize("name", ["flowcut", "tome"])
def test_keeping_everything_in_the_tower_is_the_full_model(organism_batch, name):
    vlm, batch = organism_batch
    full = R.logits(vlm, batch).logits
    kept = R.logits(vlm, batch, keep=1.0, method=name).logits
    assert kept.shape == full.shape
    torch.testing.assert_close(kept, full, atol=1e-3, rtol=1e-4)
