"""Shared pytest fixtures."""

import jax
import pytest


@pytest.fixture(params=[True, False], ids=["jit", "nojit"])
def maybe_jit(request):
    """Returns a wrapper that jits a function (static keyword args) or leaves it as is."""

    def wrap(fn, **static):
        def call(*args):
            return fn(*args, **static)

        return jax.jit(call) if request.param else call

    return wrap
