"""The paper's toy backbone as an NNX module: the architecture, parameter names and values of
``backbones.toy.ToyCNN`` (Linen), so the same weights load into either and give the same
logits. Sites: ``conv1``, ``conv2``, ``conv3``, ``dense1`` (post-ReLU), ``logits``.

``backbones.nnx_weights`` moves the parameters between the two (``load_linen_variables``,
``linen_variables``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gattanet_jax import dropout
from gattanet_jax.backbones.conv import fast_conv
from gattanet_jax.backbones.toy import DROPOUT_PLACES, KERNEL_INITS, max_pool_2x2


class ConvReLU(nnx.Conv):
    """A convolution followed by ReLU; its output is the post-activation map."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(super().__call__(x))


class DenseReLU(nnx.Linear):
    """A dense layer followed by ReLU."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(super().__call__(x))


class HashDropout(nnx.Module):
    """Inverted dropout with ``gattanet_jax.dropout``'s hash masks (as the Linen toy CNN's),
    keys from the model's ``nnx.Rngs`` stream 'dropout'; off in evaluation mode."""

    def __init__(self, rate: float, rngs: nnx.Rngs):
        self.rate, self.deterministic, self.rngs = rate, False, rngs

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0:
            return x
        return dropout.dropout(self.rngs.dropout(), x, self.rate)


class ToyCNN(nnx.Module):
    """The toy model in NNX (see ``backbones.toy.ToyCNN`` for the attributes)."""

    def __init__(
        self,
        num_classes: int = 10,
        features: Sequence[int] = (32, 64, 128),
        hidden: int = 256,
        dropout_rate: float = 0.2,
        dropout_after: str = "pooling",
        dtype=jnp.float32,
        fast_conv: bool = True,
        kernel_init: str = "flax",
        pixel_scale: float = 1.0,
        image_size: int = 32,
        in_channels: int = 3,
        *,
        rngs: nnx.Rngs,
    ):
        if dropout_after not in DROPOUT_PLACES:
            raise ValueError(f"dropout_after must be one of {DROPOUT_PLACES}: {dropout_after!r}")
        init = {"kernel_init": KERNEL_INITS[kernel_init]} if kernel_init != "flax" else {}
        conv = {"conv_general_dilated": _fast_conv} if fast_conv else {}
        self.dtype, self.pixel_scale, self.dropout_after = dtype, pixel_scale, dropout_after
        chans = [in_channels, *features]
        for i, f in enumerate(features):
            layer = ConvReLU(chans[i], f, (3, 3), padding="SAME", dtype=dtype, rngs=rngs, **conv,
                             **init)  # fmt: skip
            setattr(self, f"conv{i + 1}", layer)
        size = image_size
        for _ in features:
            size //= 2
        self.dense1 = DenseReLU(size * size * features[-1], hidden, dtype=dtype, rngs=rngs, **init)
        self.logits = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs, **init)
        places = {
            "pooling": [f"Dropout_{i}" for i in range(len(features))],
            "flatten": ["Dropout_flatten"],
            "dense1": ["Dropout_dense1"],
            "pooling_and_dense1": [
                *(f"Dropout_{i}" for i in range(len(features))),
                "Dropout_dense1",
            ],
        }[dropout_after]
        for name in places:
            setattr(self, name, HashDropout(dropout_rate, rngs))
        self.num_convs = len(features)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        if self.pixel_scale != 1.0:
            x = x * jnp.asarray(self.pixel_scale, self.dtype)
        for i in range(self.num_convs):
            x = max_pool_2x2(getattr(self, f"conv{i + 1}")(x))
            if self.dropout_after.startswith("pooling"):
                x = getattr(self, f"Dropout_{i}")(x)
        x = x.reshape(x.shape[0], -1)
        if self.dropout_after == "flatten":
            x = self.Dropout_flatten(x)
        x = self.dense1(x)
        if self.dropout_after.endswith("dense1"):
            x = self.Dropout_dense1(x)
        return self.logits(x)


def _fast_conv(*args, out_sharding=None, **kwargs):
    """``fast_conv`` as NNX's Conv calls it (it passes ``out_sharding``; with one set, XLA's
    convolution)."""
    if out_sharding is not None:
        return jax.lax.conv_general_dilated(*args, out_sharding=out_sharding, **kwargs)
    return fast_conv(*args, **kwargs)
