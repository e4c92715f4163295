"""Bad inputs to every verb: capture, saliency, knockout, answer with keep masks.

The verbs share `verb(vlm, batch, *, queries=, keys=, layers=)`; defect 10 of issue 15 was that
floats and bools were coerced to indices (`rows=[1.5]` -> 1, `layers=True` -> 1). These rows use
the unified keyword `queries=` (vtrlab.probes / vtrlab.flow, "core" helper's branch).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bad_cases import Case, params, run_case

import vtrlab as vl

SELECTORS = ("'last'", "'question'", "'image'")  # the accepted names are listed in each error


def cap(**kw):
    return lambda c: vl.capture(c["vlm"], c["batch"], **{"layers": [0], "vision": False, **kw})


def sal(**kw):
    return lambda c: vl.saliency(c["vlm"], c["batch"], **{"layers": [0], **kw})


def ko(**kw):
    return lambda c: vl.knockout(c["vlm"], c["batch"], **{"layers": [0], **kw})


def ans(keep=None, **kw):
    def call(c):
        k = keep(c) if callable(keep) else keep
        return vl.answer(c["vlm"], c["batch"], keep=k, **{"max_new_tokens": 2, **kw})

    return call


def kept(keep):
    """Image tokens each sample keeps under method 'random' at budget ``keep`` (what ``vl.answer`` sends the LM)."""

    def call(c):
        rec = vl.reduce.apply(c["vlm"], c["batch"], "random", keep=keep)
        vl.answer(c["vlm"], c["batch"], keep=keep, method="random", max_new_tokens=1)  # accepted by answer too
        return [int(k) for k in rec.kept.values[:, -1].sum(-1)]

    return call


def masks(n_extra=0, dtype=bool, count=None, fill=True, shape=None):
    def make(c):
        n = c["n_img"] + n_extra
        one = np.full(shape or n, fill, dtype=dtype) if shape is None else np.full(shape(c["n_img"]), fill, dtype)
        return [one.copy() for _ in range(count if count is not None else 2)]

    return make


def is_dataset(ds):
    import xarray as xr

    return isinstance(ds, xr.Dataset)


def answers(n=2):
    return lambda out: isinstance(out, list) and len(out) == n and all(isinstance(a, str) for a in out)


BAD_POSITIONS = [  # (id, value, error, fragments)
    ("float", 1.5, ValueError, ("1.5",)),
    ("bool_true", True, ValueError, ("True",)),
    ("bool_false", False, ValueError, ("False",)),
    ("unknown_name", "answer", ValueError, ("'answer'", "'last'")),
    ("typo", "lst", ValueError, ("'lst'",)),
    ("none", None, ValueError, ("None",)),
    ("dict", {"a": 1}, ValueError, ("{'a': 1}",)),
    ("empty_list", [], ValueError, ("[]",)),
    ("list_of_floats", [1.5], ValueError, ("1.5",)),
    ("list_of_bools", [True], ValueError, ("True",)),
    ("float_array", np.array([1.5]), ValueError, ("float64",)),
    ("far_negative", -1000, ValueError, ("not real tokens",)),
    ("past_the_end", 10**6, ValueError, ("1000000", "not real tokens")),
    ("list_past_end", [3, 10**6], ValueError, ("1000000",)),
    ("pad_position", [0, 0], ValueError, ("[0, 0]", "not real tokens")),
]

GOOD_POSITIONS = [("int_list", [5, 6]), ("tensor_ints", torch.tensor([5]))]  # a few: each is a forward

BAD_LAYERS = [
    ("bool", True, ValueError, ("True",)),
    ("float", 1.5, ValueError, ("1.5",)),
    ("float_integral", 1.0, ValueError, ("1.0",)),
    ("too_low", -100, ValueError, ("-100",)),
    ("too_high", 99, ValueError, ("99", "is not an index in 0..")),
    ("name", "first", ValueError, ("'first'", "'all'")),
    ("empty", [], ValueError, ("[]",)),
    ("none", None, ValueError, ("None",)),
    ("list_float", [1.0], ValueError, ("1.0",)),
    ("list_bool", [True], ValueError, ("True",)),
    ("list_too_high", [0, 99], ValueError, ("99",)),
]

CASES: list[Case] = []
for verb, make in (("capture", cap), ("saliency", sal), ("knockout", ko)):
    for name, value, err, frags in BAD_POSITIONS:
        CASES.append(Case(f"{verb}_queries_{name}", make(queries=value), err, frags))
    for name, value, err, frags in BAD_LAYERS:
        CASES.append(Case(f"{verb}_layers_{name}", make(layers=value), err, frags))
for name, value in GOOD_POSITIONS:
    CASES.append(Case(f"capture_queries_ok_{name}", cap(queries=value), None, check=is_dataset))
for name, value, err, frags in BAD_POSITIONS:
    CASES.append(Case(f"knockout_keys_{name}", ko(keys=value), err, frags))
CASES += [
    Case("knockout_keys_ok_image", ko(keys="image"), None, check=is_dataset),
    Case("capture_unknown_keyword_rows", cap(rows="last"), TypeError, ("rows",), ours=False),
    # saliency targets
    Case("saliency_target_float", sal(target=1.5), ValueError, ("1.5", "token id")),
    Case("saliency_target_string", sal(target="red"), ValueError, ("'red'", "string")),
    Case("saliency_target_bool", sal(target=True), ValueError, ("True",)),
    Case("saliency_target_one_for_two", sal(target=[1]), ValueError, ("1 token ids", "2 samples")),
    Case("saliency_target_three_for_two", sal(target=[1, 2, 3]), ValueError, ("3 token ids",)),
    Case("saliency_target_out_of_vocab", sal(target=[1, 10**9]), ValueError, ("1000000000",)),
    Case("saliency_target_negative", sal(target=[1, -1]), ValueError, ("-1",)),
    Case("saliency_target_ok_list", sal(target=[1, 2]), None, check=is_dataset),
    # answer with keep masks
    Case("answer_keep_one_mask_for_two", ans(masks(count=1)), ValueError, ("1 masks", "2 samples")),
    Case("answer_keep_three_masks_for_two", ans(masks(count=3)), ValueError, ("3 masks",)),
    Case("answer_keep_too_long", ans(masks(n_extra=1)), ValueError, ("keep[0]", "(257,)", "(256,)")),
    Case("answer_keep_too_short", ans(masks(n_extra=-1)), ValueError, ("keep[0]", "(255,)")),
    Case("answer_keep_float", ans(masks(dtype=float)), ValueError, ("keep[0]", "float64", "bool")),
    Case("answer_keep_half", ans(masks(dtype=float, fill=0.5)), ValueError, ("float64",)),
    Case("answer_keep_int", ans(masks(dtype=np.int64)), ValueError, ("int64",)),
    Case("answer_keep_2d", ans(masks(shape=lambda n: (2, n))), ValueError, ("keep[0]", "(2, 256)")),
    Case("answer_keep_ok_all_true", ans(masks()), None, check=answers()),
    Case("answer_keep_ok_drop_all", ans(masks(fill=False)), None, check=answers()),
    Case("answer_max_new_tokens_zero", ans(None, max_new_tokens=0), ValueError, ("max_new_tokens=0",)),
    Case("answer_max_new_tokens_negative", ans(None, max_new_tokens=-1), ValueError, ("max_new_tokens=-1",)),
    # max_new_tokens: an int >= 1, never rounded (1.5 was range(1.5) deep inside; True was 1)
    Case("answer_max_new_tokens_float", ans(None, max_new_tokens=1.5), TypeError, ("max_new_tokens=1.5", ">= 1")),
    Case("answer_max_new_tokens_float_integral", ans(None, max_new_tokens=2.0), TypeError, ("max_new_tokens=2.0",)),
    Case("answer_max_new_tokens_true", ans(None, max_new_tokens=True), TypeError, ("max_new_tokens=True",)),
    Case("answer_max_new_tokens_none", ans(None, max_new_tokens=None), TypeError, ("max_new_tokens=None",)),
    Case("answer_max_new_tokens_string", ans(None, max_new_tokens="2"), TypeError, ("max_new_tokens='2'",)),
    Case("answer_max_new_tokens_ok_numpy_int", ans(None, max_new_tokens=np.int64(1)), None, check=answers()),
    # keep with a method: an int is a number of image tokens, a float a ratio in (0, 1] (1 is one token, 1.0 all)
    Case("answer_method_keep_int_one_is_one_token", kept(1), None, check=lambda n: n == [1, 1]),
    Case("answer_method_keep_float_one_is_all", kept(1.0), None, check=lambda n: n == [256, 256]),
    Case("answer_method_keep_int_zero", kept(0), None, check=lambda n: n == [0, 0]),
    Case("answer_method_keep_ok_int", ans(3, method="random"), None, check=answers()),
    Case("answer_method_keep_float_zero", ans(0.0, method="random"), ValueError, ("keep=0.0", "(0, 1]")),
    Case("answer_method_keep_ratio_above_one", ans(1.5, method="random"), ValueError, ("keep=1.5", "(0, 1]")),
    Case("answer_method_keep_negative_int", ans(-1, method="random"), ValueError, ("keep=-1", "0..256")),
    Case("answer_method_keep_too_many", ans(257, method="random"), ValueError, ("keep=257", "0..256")),
    Case("answer_method_keep_true", ans(True, method="random"), TypeError, ("keep=True",)),
    Case("answer_method_keep_string", ans("0.5", method="random"), TypeError, ("keep='0.5'", "ratio")),
    Case("answer_method_keep_none", ans(None, method="random"), ValueError, ("'random'", "keep=")),
    Case("answer_keep_ratio_without_method", ans(0.5), ValueError, ("keep=0.5", "method=")),
    Case("answer_keep_int_without_method", ans(3), ValueError, ("keep=3", "method=")),
    # method names: the registry's names, listed in the error
    Case("answer_method_unknown", ans(0.5, method="nope"), ValueError, ("'nope'", "fastv", "random")),
    Case("answer_method_wrong_case", ans(0.5, method="FastV"), ValueError, ("'FastV'", "fastv")),
    Case("answer_method_empty", ans(0.5, method=""), ValueError, ("''", "accepted")),
    Case("answer_method_int", ans(0.5, method=3), ValueError, ("3", "accepted")),
    Case("answer_params_without_method", ans(None, layer=2), ValueError, ("['layer']", "method=")),
]


@pytest.fixture(scope="module")
def ctx(organism, batch):
    return {"vlm": organism, "batch": batch, "n_img": int(batch.layouts[0].table().shape[0])}


@params(CASES)
def test_bad_verbs(case, ctx):
    run_case(case, ctx)
