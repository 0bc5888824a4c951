"""The paper's toy backbone (section 2.0.1): three conv layers, two dense layers.

conv3x3(32)-ReLU-maxpool2-dropout, conv3x3(64)-ReLU-maxpool2-dropout,
conv3x3(128)-ReLU-maxpool2-dropout, flatten, dense(256)-ReLU, dense(n_classes) (logits; the
softmax lives in the loss). 620,362 parameters for 10 classes, 643,492 for 100. The dropout
layers can sit elsewhere (``dropout_after``): the text does not place them.

Layers with a ReLU are modules of their own (like a Keras ``Conv2D(activation='relu')``), so
that their module output is the post-ReLU activation that GAttANet reads and modulates. The module
has no attention code.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gattanet_jax import dropout
from gattanet_jax.backbones.conv import fast_conv

# Where the toy model's dropout layers sit (the paper's "0.2 drop-out as regularization" does not
# say): after each pooling, once on the flattened features, once after dense1's ReLU (before the
# logits), or after each pooling and after dense1 (the layout of Keras' CIFAR-10 examples).
DROPOUT_PLACES = ("pooling", "flatten", "dense1", "pooling_and_dense1")

KERNEL_INITS = {
    "flax": nn.initializers.lecun_normal(),  # Flax's default for nn.Conv and nn.Dense
    "keras": nn.initializers.glorot_uniform(),  # Keras' default for Conv2D and Dense
}


class ConvReLU(nn.Conv):
    """A convolution followed by ReLU; its output is the post-activation map."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(super().__call__(x))


class DenseReLU(nn.Dense):
    """A dense layer followed by ReLU."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(super().__call__(x))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2 (floor on odd sizes, like Keras' 'valid').

    Written as a reshape and a max: the same values as ``nn.max_pool(x, (2, 2), (2, 2))``, but XLA
    compiles it (and its gradient) to much faster code on CPU than a reduce-window.
    """
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2, :]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class HashDropout(nn.Module):
    """Inverted dropout like ``nn.Dropout`` (rng stream 'dropout', one key per layer), with the
    masks of ``gattanet_jax.dropout`` (a counter-based hash) instead of threefry bits: on CPU
    the toy CNN's three dropout layers cost about 30 ms of a 165 ms training step with threefry
    at batch 128, a few ms with the hash."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0:
            return x
        return dropout.dropout(self.make_rng("dropout"), x, self.rate)


class ToyCNN(nn.Module):
    """The toy model. Default sites: conv1, conv2, conv3, dense1, logits ('cccdd').

    Attributes:
      num_classes: units of the logits layer.
      features: channels of the three conv layers (the paper: 32, 64, 128).
      hidden: units of the first dense layer (the paper: 256).
      dropout_rate: the dropout rate (the paper: 0.2), active only when ``train``.
      dropout_after: where dropout sits, one of ``DROPOUT_PLACES``: 'pooling' (after each
        pooling), 'flatten' (once, before dense1), 'dense1' (once, after dense1's ReLU) or
        'pooling_and_dense1'. No parameters either way.
      dtype: computation dtype (parameters stay float32).
      fast_conv: convolutions through ``backbones.conv.fast_conv`` (the same values; faster
        on CPU for the RGB input layer); False: XLA's convolution everywhere.
      kernel_init: 'flax' (Flax's default, LeCun normal) or 'keras' (Keras' default, Glorot
        uniform); biases start at zero either way, as in both libraries.
      pixel_scale: inputs are images in [0, 1] and the model sees them times this: 1, or 255 for
        the raw pixel values that Keras' ImageDataGenerator feeds without ``rescale``.
    """

    num_classes: int = 10
    features: Sequence[int] = (32, 64, 128)
    hidden: int = 256
    dropout_rate: float = 0.2
    dropout_after: str = "pooling"
    dtype: jnp.dtype = jnp.float32
    fast_conv: bool = True
    kernel_init: str = "flax"
    pixel_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.dropout_after not in DROPOUT_PLACES:
            raise ValueError(
                f"dropout_after must be one of {DROPOUT_PLACES}: {self.dropout_after!r}"
            )
        init = {"kernel_init": KERNEL_INITS[self.kernel_init]} if self.kernel_init != "flax" else {}
        x = x.astype(self.dtype)
        if self.pixel_scale != 1.0:
            x = x * jnp.asarray(self.pixel_scale, self.dtype)
        for i, f in enumerate(self.features):
            x = ConvReLU(
                f,
                (3, 3),
                padding="SAME",
                dtype=self.dtype,
                conv_general_dilated=fast_conv if self.fast_conv else None,
                name=f"conv{i + 1}",
                **init,
            )(x)
            x = max_pool_2x2(x)
            if self.dropout_after.startswith("pooling"):
                x = HashDropout(self.dropout_rate, name=f"Dropout_{i}")(x, deterministic=not train)
        x = x.reshape(x.shape[0], -1)
        if self.dropout_after == "flatten":
            x = HashDropout(self.dropout_rate, name="Dropout_flatten")(x, deterministic=not train)
        x = DenseReLU(self.hidden, dtype=self.dtype, name="dense1", **init)(x)
        if self.dropout_after.endswith("dense1"):
            x = HashDropout(self.dropout_rate, name="Dropout_dense1")(x, deterministic=not train)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="logits", **init)(x)


TOY_SITES = ("conv1", "conv2", "conv3", "dense1", "logits")
