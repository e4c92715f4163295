"""Bad inputs to reduction methods (`vl.reduce.get` / `vl.reduce.apply`, the "reduce" helper's
registry)."""

from __future__ import annotations

import math

import pytest
from bad_cases import Case, params, run_case

import vtrlab.reduce as R

KEEP_FIRST = ("fastv", "oracle", "pooling", "random")  # methods that check keep= before anything else
BAD_KEEP = [  # (id, keep, error, fragments)
    ("ratio_above_one", 1.5, ValueError, ("keep=1.5",)),
    ("negative_ratio", -0.1, ValueError, ("keep=-0.1",)),
    ("nan", math.nan, ValueError, ("keep=nan",)),
    ("inf", math.inf, ValueError, ("keep=inf",)),
    ("bool", True, TypeError, ("keep=True",)),
    ("string", "half", TypeError, ("keep='half'",)),
    ("none", None, TypeError, ("keep=None",)),
    ("too_many_tokens", 10**6, ValueError, ("keep=1000000", "0..256")),
    ("negative_count", -3, ValueError, ("-3",)),
]


def apply(method, keep=0.25, **kw):
    return lambda c: R.apply(c["vlm"], c["batch"], method, keep=keep, **kw)


CASES = [
    Case("get_unknown", lambda c: R.get("fastvv"), ValueError, ("'fastvv'", "accepted:", "fastv")),
    Case("get_int_name", lambda c: R.get(3), ValueError, ("3",)),
    Case("get_none_name", lambda c: R.get(None), (TypeError, ValueError), ("None",)),
    Case("get_unknown_parameter", lambda c: R.get("fastv", layerr=2), ValueError, ("'layerr'", "accepted: layer")),
    Case("get_float_parameter", lambda c: R.get("fastv", layer=1.5), TypeError, ("layer=1.5", "int")),
    Case("get_bool_parameter", lambda c: R.get("fastv", layer=True), TypeError, ("layer=True",)),
    Case("get_str_parameter", lambda c: R.get("fastv", layer="2"), TypeError, ("layer='2'",)),
    Case("get_ok", lambda c: R.get("fastv", layer=1), None, check=lambda m: m is not None),
    Case("names_listed", lambda c: R.names(), None, check=lambda n: set(KEEP_FIRST) <= set(n)),
    Case("feather_default_layer_beyond_lm", apply("feather"), ValueError, ("layer=8", "decoder layers")),
    Case("pyramiddrop_default_layer_beyond_lm", apply("pyramiddrop"), ValueError, ("layer=8", "decoder layers")),
    Case("oracle_without_relevance", apply("oracle", keep=4), ValueError, ("relevance",)),
    Case("pooling_zero_budget", apply("pooling", keep=0), ValueError, ("budget 0",)),
    Case("random_keep_zero_ok", apply("random", keep=0), None, check=lambda ds: ds is not None),
    Case("fastv_layer_beyond_lm", apply("fastv", layer=40), ValueError, ("40",)),
]
for method in KEEP_FIRST:
    for name, keep, err, frags in BAD_KEEP:
        CASES.append(Case(f"{method}_keep_{name}", apply(method, keep=keep), err, frags))
    CASES.append(Case(f"{method}_unknown_parameter", apply(method, bogus=1), ValueError, ("'bogus'",)))


@pytest.fixture(scope="module")
def ctx(organism, batch):
    return {"vlm": organism, "batch": batch}


@params(CASES)
def test_bad_reduce(case, ctx):
    run_case(case, ctx)
