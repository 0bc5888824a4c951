"""A drop-in for ``lax.conv_general_dilated`` that is faster on CPU for thin inputs.

Any Flax backbone can use it: ``nn.Conv(features, (3, 3), conv_general_dilated=fast_conv)``
(the toy CNN does). The parameters, their names and the values are those of ``nn.Conv``.

On CPU, XLA's convolution is slow when the input has few channels (an RGB image): its forward
and especially its weight gradient. There, the convolution is computed as a matrix product over
the k x k patches (im2col): the patches are kh * kw shifted slices of the padded input
concatenated along channels, so the forward is one (B*H*W, kh*kw*C) @ (kh*kw*C, F) product and
its weight gradient (by autodiff) one (kh*kw*C, B*H*W) @ (B*H*W, F) product. Measured on the
2-core development CPU, batch 128, 32 x 32 x 3 -> 32 channels: forward 11.4 -> 5.2 ms, weight
gradient 19.3 -> 7.2 ms; with 32 input channels the patch matrix costs more than it saves
(weight gradient 23 -> 43 ms), so wider inputs, other strides and dilations, and every other
backend (GPU, TPU) keep XLA's own convolution (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# The patch matrix is used when kh * kw * C_in is at most this (the toy CNN's first layer: 27).
IM2COL_MAX_COLUMNS = 64

_NHWC = ("NHWC", "HWIO", "NHWC")


def _same_size_pads(lhs, rhs, window_strides, padding):
    """The explicit (low, high) pads of a stride-1 convolution whose output keeps the input's
    spatial size, or None if the padding does that not."""
    kernel = rhs.shape[:2]
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], kernel, window_strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    if len(pads) != 2 or any(lo + hi != k - 1 for (lo, hi), k in zip(pads, kernel, strict=True)):
        return None
    return pads


def _im2col_applies(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dn, groups) -> bool:
    if jax.default_backend() != "cpu" or lhs.ndim != 4 or groups != 1:
        return False
    if dn is None or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn) != (
        lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    ):
        return False
    ones = (None, (1, 1), [1, 1])
    if tuple(window_strides) != (1, 1) or lhs_dilation not in ones or rhs_dilation not in ones:
        return False
    kh, kw, c, _ = rhs.shape
    return kh * kw * c <= IM2COL_MAX_COLUMNS


def im2col_conv(lhs, rhs, pads, precision=None, preferred_element_type=None):
    """An NHWC x HWIO stride-1 convolution as a matrix product over the patches."""
    _, h, w, c = lhs.shape
    kh, kw, _, f = rhs.shape
    x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
    patches = jnp.concatenate(
        [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )  # column (i * kw + j) * C + c holds tap (i, j), channel c: rhs's row-major order
    return lax.dot_general(
        patches,
        rhs.reshape(kh * kw * c, f),
        (((3,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def fast_conv(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """``lax.conv_general_dilated`` with the same arguments and values; the patch-matrix path
    where it measures faster (see the module docstring), XLA's convolution everywhere else."""
    if batch_group_count == 1 and _im2col_applies(
        lhs,
        rhs,
        window_strides,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
    ):
        pads = _same_size_pads(lhs, rhs, window_strides, padding)
        if pads is not None:
            return im2col_conv(lhs, rhs, pads, precision, preferred_element_type)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
