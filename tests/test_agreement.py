"""Each pure function of gattanet_jax.agreement against the loop-based NumPy reference."""

import numpy as np
import pytest

from gattanet_jax import agreement as agr
from tests import reference as ref

pytestmark = pytest.mark.reference


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CASES = [(1, 3, 4, 5, 2), (2, 4, 3, 8, 7), (5, 2, 2, 16, 4)]  # batch, h, w, c, d


@pytest.mark.parametrize(("b", "h", "w", "c", "d"), CASES)
def test_conv_project(b, h, w, c, d):
    rng = np.random.default_rng(b * 100 + d)
    acts = rng.normal(size=(b, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(c, d)).astype(np.float32)
    bias = rng.normal(size=(d,)).astype(np.float32)
    assert rel_err(agr.conv_project(acts, kernel, bias), ref.conv_keys(acts, kernel, bias)) < 1e-5


@pytest.mark.parametrize(("b", "c", "d"), [(1, 3, 2), (3, 10, 16), (4, 7, 5)])
def test_dense_project(b, c, d):
    rng = np.random.default_rng(c * 10 + d)
    acts = rng.normal(size=(b, c)).astype(np.float32)
    kernel = rng.normal(size=(c, d)).astype(np.float32)
    bias = rng.normal(size=(d,)).astype(np.float32)
    assert rel_err(agr.dense_project(acts, kernel, bias), ref.dense_keys(acts, kernel, bias)) < 1e-5


@pytest.mark.parametrize(("b", "d"), [(1, 2), (3, 5), (2, 16)])
def test_global_query_mixes_conv_and_dense_sites(b, d):
    rng = np.random.default_rng(b + d)
    queries = [
        rng.normal(size=(b, 6, 5, d)),  # conv site, 30 positions
        rng.normal(size=(b, 2, 3, d)),  # conv site, 6 positions
        rng.normal(size=(b, 9, d)),  # dense site, 9 units
        rng.normal(size=(b, 4, d)),  # dense site, 4 units
    ]
    queries = [q.astype(np.float32) for q in queries]
    assert rel_err(agr.global_query(queries), ref.global_query(queries)) < 1e-5


@pytest.mark.parametrize("shape", [(2, 4, 3, 6), (3, 7, 6), (1, 5, 5, 16)])
def test_agreement(shape):
    rng = np.random.default_rng(len(shape) + shape[-1])
    keys = rng.normal(size=shape).astype(np.float32)
    q_avg = rng.normal(size=(shape[0], shape[-1])).astype(np.float32)
    assert rel_err(agr.agreement(keys, q_avg), ref.agreement(keys, q_avg)) < 1e-5


@pytest.mark.parametrize(("shape", "kind"), [((2, 4, 3, 6), "conv"), ((3, 7), "dense")])
def test_modulate(shape, kind):
    rng = np.random.default_rng(len(shape))
    acts = rng.normal(size=shape).astype(np.float32)
    gatta = rng.normal(size=shape[:-1] if kind == "conv" else shape).astype(np.float32)
    alpha = np.float32(0.37)
    expected = ref.modulate(acts, gatta, alpha)
    assert rel_err(agr.modulate(acts, gatta, alpha, kind), expected) < 1e-5


def test_shape_errors_are_caught():
    with pytest.raises(AssertionError):
        agr.conv_project(np.zeros((1, 2, 2, 3)), np.zeros((4, 5)))
    with pytest.raises(AssertionError):
        agr.agreement(np.zeros((2, 3, 5)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="'conv' or 'dense'"):
        agr.project(np.zeros((1, 3)), np.zeros((3, 2)), None, "attn")


@pytest.mark.parametrize(("shape", "kind"), [((2, 5, 4, 6), "conv"), ((3, 9), "dense")])
def test_shortcuts_equal_the_definitions(shape, kind):
    rng = np.random.default_rng(7)
    d = 5
    acts = rng.normal(size=shape).astype(np.float32)
    kernel_k, kernel_q = (rng.normal(size=(shape[-1], d)).astype(np.float32) for _ in range(2))
    bias_k, bias_q = (rng.normal(size=(d,)).astype(np.float32) for _ in range(2))
    q_avg = rng.normal(size=(shape[0], d)).astype(np.float32)
    queries = agr.project(acts, kernel_q, bias_q, kind)
    assert rel_err(agr.mean_query(acts, kernel_q, bias_q, kind), agr.site_query(queries)) < 1e-5
    keys = agr.project(acts, kernel_k, bias_k, kind)
    fast = agr.agreement_from_acts(acts, kernel_k, bias_k, q_avg, kind)
    assert rel_err(fast, agr.agreement(keys, q_avg)) < 1e-5


def test_dropout_masks_keep_the_right_fraction_and_follow_the_key():
    import jax

    from gattanet_jax import dropout

    key = jax.random.key(0)
    mask = np.asarray(dropout.keep_mask(key, (1000, 1000), 0.25))
    assert abs(mask.mean() - 0.75) < 0.002
    # Neighbouring elements are independent: P(both kept) = 0.75^2.
    assert abs((mask[:, 1:] & mask[:, :-1]).mean() - 0.5625) < 0.002
    again = np.asarray(dropout.keep_mask(key, (1000, 1000), 0.25))
    other = np.asarray(dropout.keep_mask(jax.random.key(1), (1000, 1000), 0.25))
    np.testing.assert_array_equal(mask, again)
    assert (mask != other).mean() > 0.3
    x = np.ones((4, 4), np.float32)
    y = np.asarray(dropout.dropout(key, x, 0.25))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
