"""Property-based tests (hypothesis): parameter parsing, keep masks, image-token layouts.

Needs `hypothesis` (in the `test` extra of pyproject.toml).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vtrlab.runner.errors import ParameterError
from vtrlab.runner.params import (
    ParameterSpec,
    ParamType,
    coerce,
    load_yaml,
    parse_parameter_source,
    parse_string,
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --- parameter parsing --------------------------------------------------------------------

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12).filter(
    lambda s: s.strip() == s and "," not in s and not s.startswith("[") and s.lower() not in ("none", "null", "~")
)


@FAST
@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_int_round_trips_through_the_command_line(value):
    assert parse_string(str(value), ParamType("int")) == value


@FAST
@given(finite)
def test_finite_float_round_trips(value):
    assert parse_string(repr(value), ParamType("float")) == value


@FAST
@given(st.sampled_from(["inf", "-inf", "nan", "NaN", "Infinity", "1e999", "-1e400"]))
def test_non_finite_floats_are_refused_from_strings(value):
    with pytest.raises(ValueError, match="finite"):
        parse_string(value, ParamType("float"))


@FAST
@given(st.sampled_from([math.inf, -math.inf, math.nan]), st.booleans())
def test_non_finite_floats_are_refused_typed(value, as_list):
    ptype = ParamType("float", is_list=as_list)
    with pytest.raises(ValueError, match="finite"):
        coerce([value] if as_list else value, ptype)


@FAST
@given(st.one_of(st.booleans(), finite.filter(lambda f: not f.is_integer()), text))
def test_int_parameter_refuses_anything_but_integers(value):
    with pytest.raises((TypeError, ValueError)):
        coerce(value, ParamType("int"))


@FAST
@given(st.lists(st.integers(-1000, 1000), max_size=6), st.booleans())
def test_int_lists_parse_as_csv_and_json(values, as_json):
    rendered = str(values) if as_json else ",".join(map(str, values))
    if not values and not as_json:
        rendered = ""
    assert parse_string(rendered, ParamType("int", is_list=True)) == values


@FAST
@given(st.lists(text.filter(bool), min_size=1, max_size=5))
def test_string_lists_round_trip_through_json(values):
    import json

    assert parse_string(json.dumps(values), ParamType("str", is_list=True)) == values


@FAST
@given(st.dictionaries(st.sampled_from(["n", "x", "name"]), st.integers(0, 9), min_size=1))
def test_resolve_overlays_defaults_and_names_unknowns(values):
    spec = ParameterSpec("nb", parse_parameter_source("n: int = 1\nx: float = 0.5\nname: str = 'a'"), 1)
    typed = {k: (str(v) if k == "name" else v) for k, v in values.items()}
    resolved = spec.resolve(typed)
    assert set(resolved) == {"n", "x", "name"}
    for key, value in typed.items():
        assert resolved[key] == value and type(resolved[key]) is type(spec.defaults[key])
    with pytest.raises(ParameterError, match="'zz'"):
        spec.resolve({**typed, "zz": 1})


@FAST
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=2, max_size=5))
def test_yaml_duplicate_keys_are_always_refused(keys):
    body = "".join(f"{k}: {i}\n" for i, k in enumerate(keys))
    if len(set(keys)) < len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        with pytest.raises(ParameterError, match=f"'{dup}' given twice"):
            load_yaml(body, "g.yaml")
    else:
        assert load_yaml(body, "g.yaml") == {k: i for i, k in enumerate(keys)}


# --- keep masks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def n_img(batch):
    return [
        int(layout.n_image_tokens) if not callable(layout.n_image_tokens) else layout.n_image_tokens()
        for layout in batch.layouts
    ]


@FAST
@given(data=st.data())
def test_keep_masks_of_the_right_length_are_accepted_as_given(batch, n_img, data):
    from vtrlab.reduce.keep import validate_keep

    masks = [np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool) for n in n_img]
    out = validate_keep(batch, masks)
    assert len(out) == len(masks) and all(np.array_equal(a, b) for a, b in zip(out, masks))


@FAST
@given(delta=st.integers(-5, 5).filter(bool), which=st.integers(0, 1))
def test_keep_masks_of_another_length_are_refused_naming_the_shape(batch, n_img, delta, which):
    from vtrlab.reduce.keep import validate_keep

    masks = [np.ones(n, bool) for n in n_img]
    masks[which] = np.ones(n_img[which] + delta, bool)
    with pytest.raises(ValueError, match=rf"keep\[{which}\] has shape \({n_img[which] + delta},\)"):
        validate_keep(batch, masks)


@FAST
@given(dtype=st.sampled_from([np.float32, np.float64, np.int8, np.int64, np.uint8]))
def test_keep_masks_that_are_not_bool_are_refused(batch, n_img, dtype):
    from vtrlab.reduce.keep import validate_keep

    with pytest.raises(ValueError, match=np.dtype(dtype).name):
        validate_keep(batch, [np.ones(n, dtype) for n in n_img])


# --- layouts ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_next():
    from vtrlab import testing

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return testing.tiny("llava_next")


@SLOW
@given(w=st.integers(8, 160), h=st.integers(8, 160))
@example(w=8, h=97)  # found by hypothesis in session 6: unpads to no column (a ZeroDivisionError before)
@example(w=160, h=8)
def test_layout_positions_are_the_image_tokens_and_boxes_lie_inside_the_image(tiny_next, w, h):
    from PIL import Image

    vlm = tiny_next
    batch = vlm.prepare([Image.new("RGB", (w, h), (10, 200, 30))], ["what is it"])
    layout = batch.layouts[0]
    table = layout.table()
    image = table[table["kind"] == "image"]
    positions = image["position"].to_numpy()
    assert len(np.unique(positions)) == len(positions)  # one row per position
    ids = batch.inputs["input_ids"][0].cpu().numpy()
    token_id = vlm.model.config.image_token_id if hasattr(vlm.model.config, "image_token_id") else None
    if token_id is not None:
        assert set(np.flatnonzero(ids == token_id)) >= set(positions)
    assert (image["x0"] >= -1e-6).all() and (image["y0"] >= -1e-6).all()
    assert (image["x1"] <= w + 1e-6).all() and (image["y1"] <= h + 1e-6).all()
    assert (image["x1"] > image["x0"]).all() and (image["y1"] > image["y0"]).all()
