"""Bad images get a clear error naming the sample and what is accepted; good inputs all work."""

import numpy as np
import pytest
from PIL import Image

from vtrlab.models.images import as_image


def test_accepts_pil_arrays_and_paths(tmp_path):
    arr = (np.arange(12 * 10 * 3) % 256).astype(np.uint8).reshape(12, 10, 3)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    for obj in (Image.fromarray(arr), arr, str(path), path, arr / 255.0):
        im = as_image(obj)
        assert im.mode == "RGB" and im.size == (10, 12)
        assert np.array_equal(np.asarray(im), arr)
    gray = as_image(arr[..., 0])
    assert np.array_equal(np.asarray(gray)[..., 1], arr[..., 0])


def test_corrupt_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), "red").save(good)
    bad.write_bytes(good.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match="sample 3, image 1: .*broken.png.*not a readable image"):
        as_image(bad, "sample 3, image 1")
    with pytest.raises(FileNotFoundError, match="no image file at"):
        as_image(tmp_path / "missing.png")


@pytest.mark.parametrize(
    "obj, message",
    [
        (None, "got NoneType; accepted: PIL images"),
        (np.zeros((3, 8, 8)), "channels-first"),
        (np.zeros((4, 4, 2)), "is not an image"),
        (np.full((4, 4, 3), np.nan), "NaN"),
        (np.full((4, 4, 3), -3.0), "expected \\[0, 1\\] or \\[0, 255\\]"),
    ],
)
def test_bad_inputs(obj, message):
    with pytest.raises((TypeError, ValueError), match=message):
        as_image(obj)


def test_prepare_reports_the_bad_sample():
    from vtrlab import testing

    vlm = testing.tiny("llava")
    with pytest.raises(TypeError, match="sample 1, image 0: got NoneType"):
        vlm.prepare([Image.new("RGB", (40, 40)), None], ["a", "b"])
