"""Bad inputs to `vlm.prepare` and the image conversion behind it (`vtrlab.models.images.as_image`).

Defect 10 of issue 15: `prepare([], [])` and a 0×0 image crashed inside transformers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bad_cases import Case, params, run_case
from PIL import Image

from vtrlab.models.images import as_image

RGB = Image.new("RGB", (32, 32), (200, 30, 30))
Q = "what color is the circle ?"


def P(images, prompts):
    return lambda ctx: ctx["vlm"].prepare(images, prompts)


def A(obj):
    return lambda ctx: as_image(obj, "sample 0, image 0")


def _file(name: str, data: bytes | None = None, image: Image.Image | None = None, fmt: str = "PNG"):
    def make(ctx):
        path = ctx["tmp"] / name
        if image is not None:
            image.save(path, format=fmt)
        else:
            path.write_bytes(data or b"")
        return path

    return make


def AF(maker):
    return lambda ctx: as_image(maker(ctx), "sample 0, image 0")


def _truncated_png(ctx):
    path = ctx["tmp"] / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    cut = ctx["tmp"] / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    return cut


def _n_samples(n):
    return lambda batch: len(batch.prompts) == n and len(batch.layouts) == n


CASES = [
    # the sample structure
    Case("empty_lists", P([], []), ValueError, ("at least one sample", "0 prompts")),
    Case("empty_tuples", P((), ()), ValueError, ("at least one sample",)),
    Case("more_images_than_prompts", P([RGB, RGB], [Q]), ValueError, ("2 image entries", "1 prompts")),
    Case("more_prompts_than_images", P([RGB], [Q, Q]), ValueError, ("1 image entries", "2 prompts")),
    Case("images_none", P(None, [Q]), TypeError, ("NoneType",)),
    Case("images_int", P(3, [Q]), TypeError, ("int",)),
    Case("images_dict", P({"a": RGB}, [Q]), TypeError, ("dict",)),
    Case("single_image_list_prompts", P(RGB, [Q]), TypeError, ("one entry per prompt", "Image")),
    Case("prompts_none", P([RGB], None), TypeError, ("NoneType",)),
    Case("prompts_int", P([RGB], 5), TypeError, ("int",)),
    Case("prompts_bytes", P([RGB], b"what"), TypeError, ("bytes",)),
    Case("prompt_int", P([RGB], [5]), TypeError, ("prompt 0", "5")),
    Case("prompt_none", P([RGB, RGB], [Q, None]), TypeError, ("prompt 1", "None")),
    Case("prompt_list", P([RGB], [["a", "b"]]), TypeError, ("prompt 0",)),
    Case("prompt_bytes", P([RGB], [b"what"]), TypeError, ("prompt 0", "b'what'")),
    Case("sample_with_no_image", P([[]], [Q]), ValueError, ("sample 0", "no image")),
    Case("second_sample_no_image", P([RGB, ()], [Q, Q]), ValueError, ("sample 1", "no image")),
    Case("image_none_in_list", P([None], [Q]), TypeError, ("sample 0, image 0", "NoneType")),
    Case("image_int_in_list", P([7], [Q]), TypeError, ("sample 0, image 0", "int")),
    Case("nested_bad_image", P([[RGB, "nope.png"]], [Q]), FileNotFoundError, ("sample 0, image 1", "nope.png")),
    Case("one_string_prompt_one_image", P(RGB, Q), None, check=_n_samples(1)),
    Case("one_string_prompt_image_list", P([RGB], Q), None, check=_n_samples(1)),
    Case("empty_prompt_is_a_prompt", P([RGB], [""]), None, check=_n_samples(1)),
    Case("two_samples", P([RGB, RGB], [Q, "how many circles are there ?"]), None, check=_n_samples(2)),
    Case("zero_by_zero_pil", P([Image.new("RGB", (0, 0))], [Q]), ValueError, ("sample 0, image 0", "0×0")),
    Case("zero_width_pil", P([Image.new("RGB", (0, 5))], [Q]), ValueError, ("0×5",)),
    Case("zero_height_pil", P([Image.new("RGB", (5, 0))], [Q]), ValueError, ("5×0",)),
    Case("zero_array", P([np.zeros((0, 0, 3), np.uint8)], [Q]), ValueError, ("(0, 0, 3)",)),
    # one image: arrays
    Case("array_channels_first", A(np.zeros((3, 32, 32), np.uint8)), ValueError, ("(3, 32, 32)", "channels-first")),
    Case("array_1d", A(np.zeros(32, np.uint8)), ValueError, ("(32,)",)),
    Case("array_4d", A(np.zeros((1, 8, 8, 3), np.uint8)), ValueError, ("(1, 8, 8, 3)",)),
    Case("array_4_channels", A(np.zeros((8, 8, 4), np.uint8)), ValueError, ("(8, 8, 4)",)),
    Case("array_2_channels", A(np.zeros((8, 8, 2), np.uint8)), ValueError, ("(8, 8, 2)",)),
    Case("array_scalar", A(np.array(3)), ValueError, ("()",)),
    Case("array_nan", A(np.full((8, 8, 3), np.nan)), ValueError, ("NaN",)),
    Case("array_inf", A(np.full((8, 8, 3), np.inf)), ValueError, ("inf",)),
    Case("array_negative", A(np.full((8, 8, 3), -1.0)), ValueError, ("[-1, -1]",)),
    Case("array_too_big", A(np.full((8, 8, 3), 300.0)), ValueError, ("300",)),
    Case("array_int_too_big", A(np.full((8, 8, 3), 1000, np.int32)), ValueError, ("1000",)),
    Case("array_bool", A(np.ones((8, 8, 3), bool)), TypeError, ("bool",)),
    Case("array_complex", A(np.ones((8, 8, 3), np.complex64)), TypeError, ("complex64",)),
    Case("array_object", A(np.empty((8, 8, 3), object)), TypeError, ("object",)),
    Case("array_strings", A(np.full((8, 8, 3), "a")), TypeError, ("<U1",)),
    Case("tensor_channels_first", A(torch.zeros(3, 16, 16)), ValueError, ("(3, 16, 16)",)),
    Case("tensor_nan", A(torch.full((8, 8, 3), float("nan"))), ValueError, ("NaN",)),
    Case("list_of_lists", A([[0, 0], [0, 0]]), TypeError, ("list",)),
    Case("bytes_object", A(b"\x89PNG"), TypeError, ("bytes",)),
    Case("array_float01", A(np.full((8, 8, 3), 0.5)), None, check=lambda im: im.getpixel((0, 0)) == (128, 128, 128)),
    Case("array_float255", A(np.full((8, 8, 3), 200.0)), None, check=lambda im: im.getpixel((0, 0)) == (200,) * 3),
    Case("array_gray", A(np.full((8, 8), 7, np.uint8)), None, check=lambda im: im.mode == "RGB"),
    Case("array_single_channel", A(np.full((8, 8, 1), 7, np.uint8)), None, check=lambda im: im.size == (8, 8)),
    Case("pil_rgba", A(Image.new("RGBA", (8, 8))), None, check=lambda im: im.mode == "RGB"),
    Case("pil_palette", A(Image.new("P", (8, 8))), None, check=lambda im: im.mode == "RGB"),
    Case("pil_16bit", A(Image.new("I;16", (8, 8))), None, check=lambda im: im.mode == "RGB"),
    # one image: files
    Case("path_missing", A("/nonexistent/pic.png"), FileNotFoundError, ("/nonexistent/pic.png",)),
    Case("path_missing_pathlib", A(Path("/nonexistent/pic.jpg")), FileNotFoundError, ("pic.jpg",)),
    Case("path_is_dir", lambda ctx: as_image(ctx["tmp"], "img"), FileNotFoundError, ("img",)),
    Case("file_empty", AF(_file("empty.png", b"")), ValueError, ("empty.png", "not a readable image")),
    Case("file_text", AF(_file("notes.png", b"hello world")), ValueError, ("notes.png",)),
    Case("file_truncated", AF(_truncated_png), ValueError, ("cut.png",)),
    Case(
        "file_zero_png",
        AF(_file("zero.tif", image=Image.new("RGB", (1, 1)), fmt="TIFF")),
        None,
        check=lambda im: im.size == (1, 1),
    ),
    Case("file_jpeg", AF(_file("ok.jpg", image=RGB, fmt="JPEG")), None, check=lambda im: im.size == (32, 32)),
]


@pytest.fixture
def ctx(organism, tmp_path):
    return {"vlm": organism, "tmp": tmp_path}


@params(CASES)
def test_bad_prepare(case, ctx):
    run_case(case, ctx)
