"""Helpers shared by tests that compare whole parameter trees."""

import jax
import numpy as np


def leaves(params) -> dict:
    """{path string: numpy array} of every leaf."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_bit_identical(a, b) -> None:
    """Same paths, dtypes and values, bit for bit."""
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for key in la:
        assert la[key].dtype == lb[key].dtype, key
        np.testing.assert_array_equal(la[key], lb[key], err_msg=key)
