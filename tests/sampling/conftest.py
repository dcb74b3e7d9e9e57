from __future__ import annotations

import types

import pytest

from tests.support.gmm import GMMDenoiser
from tests.support.oracle import load
from tests.support.toys import toy_image_model  # noqa: F401  (fixtures' users import it from support)


@pytest.fixture(scope="session")
def kd() -> types.SimpleNamespace:
    """k-diffusion 0.1.1.post1 (the oracle); a missing oracle is an error, not a skip."""
    return load()


@pytest.fixture(scope="session")
def gmm() -> GMMDenoiser:
    return GMMDenoiser()
