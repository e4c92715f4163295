"""Fixtures of the bad-input suite: models built once per session (the embedded organism, CPU).

The case table helpers live in `bad_cases.py`."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(scope="session")
def organism():
    import vtrlab as vl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vl.load("organism", device="cpu")


@pytest.fixture(scope="session")
def samples():
    from vtrlab.data.synthetic import generate

    return generate(2, 0)


@pytest.fixture(scope="session")
def batch(organism, samples):
    return organism.prepare([s.image for s in samples], [s.question for s in samples])
